"""Import every metric module so that each registers itself."""
import bench.metrics.elbo  # noqa: F401
import bench.metrics.fid  # noqa: F401
import bench.metrics.nll  # noqa: F401
import bench.metrics.sde_bound  # noqa: F401
import bench.metrics.trunc  # noqa: F401
import bench.metrics.label_acc  # noqa: F401
