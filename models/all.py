"""Import every model loader module so that each registers itself (one line per model family)."""
import models.registry  # noqa: F401  (gmm)
