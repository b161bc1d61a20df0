"""Import every solver module so that each registers itself."""
import solvers.adaptive  # noqa: F401
import solvers.exponential  # noqa: F401
import solvers.multistep  # noqa: F401
import solvers.rk  # noqa: F401
import solvers.unipc  # noqa: F401
import solvers.stochastic  # noqa: F401
