"""Import every solver module so that each registers itself."""
import solvers.rk  # noqa: F401
import solvers.stochastic  # noqa: F401
