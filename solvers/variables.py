"""Integration variables for generic ODE solvers.  The probability-flow ODE is the same curve in any
of them; they differ in how well a polynomial step fits it.

- sigma_hat (default): state x_hat = x/alpha, d x_hat/d sigma_hat = eps (Karras et al. 2022, eq. 4);
  Euler here is DDIM (Song et al. 2021a; Lu et al. 2022, sec. 4.1).
- t: state x, dx/dt = f x + g^2/(2 sigma) eps (Song et al. 2021, eq. 13).
- lambda: state x, dx/d lambda = (dx/dt) / (d lambda/dt).
"""
from __future__ import annotations

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

    def deriv(self, s, y):
        """(dy/ds, eps) at variable value s; one network evaluation."""
        s = torch.as_tensor(s, dtype=torch.float64)
        t = self.t_of_s(s)
        x = self.to_x(y, t)
        eps = self.dyn.eps(x, t)
        if self.name == "sigma_hat":
            return eps, eps
        dxdt = self.dyn.ode_rhs(t, x, eps=eps)
        if self.name == "t":
            return dxdt, eps
        return dxdt / _bc(self.sch.d_lambda(t), x), eps
