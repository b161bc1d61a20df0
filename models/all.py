"""Import every model loader module so that each registers itself (one line per model family)."""
import bench.models.registry  # noqa: F401  (gmm)
import bench.models.shipped  # noqa: F401  (digits, toy2d)
import bench.models.hf_ddpm  # noqa: F401  (diffusers DDPM checkpoints; diffusers is imported only when used)
import bench.models.custom  # noqa: F401  (a user's eps-network by import path)
