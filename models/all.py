"""Import every model loader module so that each registers itself (one line per model family)."""
import models.registry  # noqa: F401  (gmm)
import models.shipped  # noqa: F401  (digits, toy2d)
