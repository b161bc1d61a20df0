"""Import every solver module so that each registers itself."""
import bench.solvers.adaptive  # noqa: F401
import bench.solvers.exponential  # noqa: F401
import bench.solvers.multistep  # noqa: F401
import bench.solvers.rk  # noqa: F401
import bench.solvers.unipc  # noqa: F401
import bench.solvers.stochastic  # noqa: F401
import bench.solvers.diffusers_sched  # noqa: F401
import bench.solvers.langevin  # noqa: F401
import bench.solvers.deis  # noqa: F401
import bench.solvers.sde_multistep  # noqa: F401
import bench.solvers.restart  # noqa: F401
import bench.solvers.ipndm_v  # noqa: F401
