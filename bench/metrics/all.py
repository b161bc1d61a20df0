"""Import every metric module so that each registers itself."""
import bench.metrics.trunc  # noqa: F401
