"""Integration variables for generic ODE solvers.  The probability-flow ODE is the same curve in any
of them; they differ in how well a polynomial step fits it.

- sigma_hat (default): state x_hat = x/alpha, d x_hat/d sigma_hat = eps (Karras et al. 2022, eq. 4);
  Euler here is DDIM (Song et al. 2021a; Lu et al. 2022, sec. 4.1).
- t: state x, dx/dt = f x + g^2/(2 sigma) eps (Song et al. 2021, eq. 13).
- lambda: state x, dx/d lambda = (dx/dt) / (d lambda/dt).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from bench.models.dynamics import _bc
from bench.models.errors import ConfigError

VARIABLES = ("sigma_hat", "t", "lambda")


class ODEVariable:
    def __init__(self, dyn, name: str):
        if name not in VARIABLES:
            raise ConfigError(f"Unknown integration variable '{name}'. Valid variables are: {', '.join(VARIABLES)}.")
        self.dyn, self.name, self.sch = dyn, name, dyn.schedule

    def s_of_t(self, t):
        return {"sigma_hat": self.sch.sigma_hat, "t": lambda u: u, "lambda": self.sch.lambda_}[self.name](t)

    def t_of_s(self, s):
        return {"sigma_hat": self.sch.t_of_sigma_hat, "t": lambda u: u, "lambda": self.sch.t_of_lambda}[self.name](s)

    def to_state(self, x, t):
        return x / _bc(self.sch.alpha(t), x) if self.name == "sigma_hat" else x

    def to_x(self, y, t):
        return y * _bc(self.sch.alpha(t), y) if self.name == "sigma_hat" else y

    def points(self, s) -> list[GridPoint]:
        """What deriv needs at each variable value in s (t, and alpha(t), or f(t), g^2/(2 sigma), d lambda/dt), from
        the schedule in one call and as Python floats, so a solver computes it once per grid (issue 17) and its step
        loop does tensor arithmetic only, with scalar coefficients."""
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1)
        if not len(s):
            return []
        t = self.t_of_s(s)
        none = [None] * len(t)
        alpha = floats(self.sch.alpha(t), t) if self.name == "sigma_hat" else none
        f = floats(self.sch.f(t), t) if self.name != "sigma_hat" else none
        c = floats(self.sch.g2(t) / (2 * self.sch.sigma(t)), t) if self.name != "sigma_hat" else none
        dlam = floats(self.sch.d_lambda(t), t) if self.name == "lambda" else none
        return [GridPoint(*p) for p in zip(s.tolist(), t.tolist(), alpha, f, c, dlam)]

    def grid(self, t):
        """The solve's set-up from one evaluation of the schedule on the grid t (issue 17): (s, pts, g) with s the
        variable's values, pts their GridPoints, and g = grid_floats(schedule, t), which also gives to_state's and the
        final x0's alpha and sigma.  In sigma_hat the grid's GridPoints need no t(s) round trip: s = sigma_hat(t)."""
        g = grid_floats(self.sch, t)
        if self.name != "sigma_hat":
            s = self.s_of_t(torch.as_tensor(t, dtype=torch.float64)).tolist()
            return s, self.points(s), g
        return g.sigma_hat, [GridPoint(si, ti, ai, None, None, None) for si, ti, ai in zip(g.sigma_hat, g.t, g.alpha)], g

    def start(self, x, g):
        """to_state(x, t[0]) with alpha(t[0]) from grid_floats."""
        return x.div(g.alpha[0]) if self.name == "sigma_hat" else x

    def end(self, y, eps, g):
        """The final x0-prediction at t[-1] (DESIGN 'final step') from the state y there and the evaluation eps, with
        the grid's floats: Dynamics.x0_at(to_x(y, t[-1]), ...)."""
        x = y.mul(g.alpha[-1]) if self.name == "sigma_hat" else y
        return self.dyn.x0_at(x, g.t[-1], g.alpha[-1], g.sigma[-1], eps)

    def deriv(self, s, y):
        """(dy/ds, eps) at variable value s (a number, or a GridPoint from `points`); one network evaluation."""
        if isinstance(s, GridPoint):            # floats: fused tensor ops with scalar coefficients (issue 17)
            if self.name == "sigma_hat":
                eps = self.dyn.eps(y * s.alpha, s.t)                          # to_x(y, t)
                return eps, eps
            eps = self.dyn.eps(y, s.t)
            dxdt = torch.add(y * s.f, eps, alpha=s.c)                         # f x + g^2/(2 sigma) eps (Song eq. 13)
            return (dxdt if self.name == "t" else dxdt.div_(s.dlam)), eps
        t = self.t_of_s(torch.as_tensor(s, dtype=torch.float64))   # a single value: evaluated here
        alpha = self.sch.alpha(t) if self.name == "sigma_hat" else None
        x = y * _bc(alpha, y) if self.name == "sigma_hat" else y              # to_x(y, t)
        eps = self.dyn.eps(x, t)
        if self.name == "sigma_hat":
            return eps, eps
        dxdt = self.dyn.ode_rhs(t, x, eps=eps)
        if self.name == "t":
            return dxdt, eps
        return dxdt / _bc(self.sch.d_lambda(t), x), eps


def floats(v, t) -> list[float]:
    """A schedule quantity evaluated on the grid tensor t, as Python floats (float64, exact; t is a host tensor, so
    this is no device synchronisation), broadcast to t's length for a schedule that returns a constant."""
    return torch.as_tensor(v, dtype=torch.float64).expand(t.shape).tolist()


class GridFloats(NamedTuple):
    t: list[float]
    alpha: list[float]
    sigma: list[float]
    lam: list[float]             # lambda = log(alpha/sigma)
    sigma_hat: list[float]       # sigma/alpha = exp(-lambda)


def grid_floats(sch, t) -> GridFloats:
    """t, alpha, sigma, lambda and sigma_hat at the times t as Python floats, from one log_alpha and one log_sigma call
    of the schedule on the whole tensor and one .tolist() (issue 17); the same formulas as NoiseSchedule.alpha, sigma,
    lambda_ and sigma_hat (alpha = exp(log alpha), lambda = log alpha - log sigma, sigma_hat = exp(-lambda))."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    la, ls = sch.log_alpha(t), sch.log_sigma(t)
    la, ls = torch.as_tensor(la, dtype=torch.float64).expand(t.shape), torch.as_tensor(ls, dtype=torch.float64).expand(t.shape)
    lam = la - ls
    return GridFloats(*torch.stack([t, la.exp(), ls.exp(), lam, (-lam).exp()]).tolist())


class GridPoint(NamedTuple):
    s: float                 # the variable's value
    t: float                 # the time it maps to
    alpha: float | None      # alpha(t) (variable sigma_hat: x = alpha x_hat)
    f: float | None          # f(t) (variables t, lambda: dx/dt = f x + c eps)
    c: float | None          # g^2(t) / (2 sigma(t))
    dlam: float | None       # d lambda / dt (variable lambda)
