"""torchdiffeq's methods on the probability-flow ODE in u = log sigma_hat:  d x_hat/du = sigma_hat eps
(Karras et al. 2022, eq. 4 with the chain rule), then the final step x0 at t[-1] (DESIGN 'final step').

Adaptive methods (dopri5, ...; Dormand & Prince 1980) choose their own steps from rtol/atol: the NFE
budget is then a cap.  The grid has steps = budget points, of which only the ends are used; a solve
that would need more evaluations than the cap stops with a ConfigError (loosen rtol/atol or raise nfe),
so the budget is never exceeded; the counted NFE is what the run records.  Fixed-grid methods
(euler, midpoint, heun2, heun3, rk4) step along the given grid: NFE = stages*(steps-1) + 1.
"""
from __future__ import annotations

import torch

from bench.models.dynamics import _bc
from bench.models.errors import ConfigError
from bench.solvers.knobs import check_choice
from bench.solvers.registry import register_solver

ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_STAGES = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}
FIXED_ORDER = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}
METHODS = ADAPTIVE + tuple(FIXED_STAGES)


class NFECapExceeded(ConfigError):
    pass


def trajectory_log_sigma_hat(dyn, x_T, t, rtol=1e-5, atol=1e-5, method="dopri5", nfe_cap=None):
    """States x(t_k) of the probability-flow ODE from x_T at t[0], at every time of t, shape (len(t), *x_T.shape):
    odeint in u = log sigma_hat (fixed-grid methods step on every grid point; adaptive ones choose their own
    steps and interpolate at t).  Evaluations go through dyn's counter; nfe_cap stops a solve before it
    would exceed the cap (one evaluation is kept for the final x0-prediction)."""
    sch = dyn.schedule
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
    u = torch.log(sch.sigma_hat(t)).to(x_T)

    def rhs(u_, x_hat):
        if nfe_cap is not None and dyn.nfe + 2 > nfe_cap:          # +1 for this call, +1 for the final x0
            raise NFECapExceeded(
                f"solver '{method}' needs more than the NFE budget of {nfe_cap} at rtol={rtol}, atol={atol}: "
                f"loosen rtol/atol or raise nfe.")
        return torch.exp(u_) * dyn.ode_rhs_sigma_hat(torch.exp(u_), x_hat)

    kw = {} if method in FIXED_STAGES else {"rtol": rtol, "atol": atol}
    from torchdiffeq import odeint     # deferred: torchdiffeq (and scipy) only for the solvers that use it

    x_hat = odeint(rhs, x_T / _bc(sch.alpha(t[0]), x_T), u, method=method, **kw)
    return x_hat * sch.alpha(t).to(x_T).reshape(-1, *([1] * x_T.dim()))


def solve_log_sigma_hat(dyn, x_T, t, rtol=1e-5, atol=1e-5, method="dopri5", nfe_cap=None):
    """x_0 from x_T at t[0]: the trajectory to t[-1] (adaptive methods use only the ends of t), then the
    x0-prediction at t[-1] (DESIGN 'final step')."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    if method in ADAPTIVE:
        t = t[[0, -1]]
    x_end = trajectory_log_sigma_hat(dyn, x_T, t, rtol, atol, method, nfe_cap)[-1]
    return dyn.x0(x_end, t[-1])


def _check(method):
    check_choice("dopri5", "method", method, METHODS)


def dopri5_sample(dyn, x, t, rng=None, method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5):
    """torchdiffeq `method` on the probability-flow ODE in log sigma_hat; adaptive methods are capped at len(t) NFE."""
    _check(method)
    if method in ADAPTIVE and (not rtol > 0 or not atol > 0):
        raise ConfigError(f"solver 'dopri5': rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    return solve_log_sigma_hat(dyn, x, t, rtol, atol, method, nfe_cap=len(t) if method in ADAPTIVE else None)


def _nfe(steps, method="dopri5", **_):
    _check(method)
    return steps if method in ADAPTIVE else FIXED_STAGES[method] * (steps - 1) + 1


register_solver("dopri5", nfe_of_steps=_nfe,
                nfe_formula="adaptive: counted, at most the budget (steps = budget); fixed grid: stages*(steps-1) + 1",
                min_steps=2, order=lambda method="dopri5", **_: FIXED_ORDER.get(method),
                default_timesteps="edm", batch_coupled=True)(dopri5_sample)
