"""DEIS (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential integrator", ICLR): multistep
exponential integrators with one NFE per step, tAB and rhoAB (sec. 4).

The probability-flow ODE dx/dt = f x + g^2/(2 sigma) eps is solved exactly in its linear part (eq. 14):
    x(t_{i+1}) = Psi(t_{i+1}, t_i) x(t_i) + int_{t_i}^{t_{i+1}} Psi(t_{i+1}, tau) g^2/(2 sigma) eps(tau) dtau,
Psi(t, s) = alpha(t)/alpha(s), and eps(tau) is replaced by the polynomial P_r through the last r + 1 evaluations
(eq. 15), which gives x_{i+1} = Psi x_i + sum_j C_ij eps_{i-j} with C_ij = int Psi g^2/(2 sigma) l_j dtau (eq. 16-17).
Since Psi(t_{i+1}, tau) g^2/(2 sigma) dtau = alpha(t_{i+1}) d sigma_hat(tau) (g^2 = -2 sigma^2 d lambda/dt and
sigma_hat = e^-lambda, models/schedules.py), in x_hat = x/alpha the update is
    x_hat_{i+1} = x_hat_i + sum_j W_ij eps_{i-j},   W_ij = C_ij / alpha(t_{i+1}) = int_{sh_i}^{sh_{i+1}} l_j d sigma_hat,
and the methods differ only in the variable v in which l_j, the Lagrange basis on the last r + 1 points, is a
polynomial (METHODS): tAB in t (eq. 15), rhoAB in rho = sigma_hat (sec. 4, dv/drho = eps; the same weights as
variable-step Adams-Bashforth in sigma_hat: solver ab), logrho in log rho = -lambda (diffusers'
DEISMultistepScheduler, solver_type 'logrho').  W is computed once per grid by composite Gauss-Legendre quadrature
in log sigma_hat (deis_weights).

Order knob r = degree of P_r (the paper's tAB-r / rhoAB-r; diffusers' solver_order = r + 1): global order r + 1.
Start-up (knob `startup`): 'lower' (the paper's and diffusers' warm-up, NFE = steps): the update from t_i uses the
min(r, i) + 1 points it has, so the first step is DDIM, whose local O(h^2) error caps the global order at 2 (as ab's
'lower', solvers/multistep.py; it shows only at large NFE); 'rk': the first r steps (r >= 2) are Runge-Kutta steps
of order r in sigma_hat (rhoRK-DEIS, sec. 4: heun for r = 2, Kutta's rk3 for r = 3) whose first stage is the history
point, so the order is r + 1 at NFE = steps + 2 (r = 2) or steps + 6 (r = 3).
The final step is the x0-prediction at t[-1] from the evaluation there (DESIGN 'final step').
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from bench.solvers.knobs import check_choice
from bench.solvers.multistep import STARTUP_TABLEAU
from bench.solvers.registry import register_solver
from bench.solvers.rk import TABLEAUS, _axpy, rk_apply, rk_plan
from bench.solvers.variables import ODEVariable

ORDERS = (1, 2, 3)
METHODS = {"tab": "t", "rhoab": "sigma_hat", "logrho": "lambda"}   # method -> variable of the eps polynomial
STARTUPS = ("lower", "rk")
QUAD_NODES, QUAD_WIDTH = 16, 0.25    # Gauss-Legendre nodes per piece; widest piece in log sigma_hat


def _check(order, method, startup):
    check_choice("deis", "order", order, ORDERS)
    check_choice("deis", "method", method, tuple(METHODS))
    check_choice("deis", "startup", startup, STARTUPS)


def _rk_steps(order, startup, steps):
    """How many of the steps - 1 intervals are Runge-Kutta start-up steps (an Euler = DDIM start suffices for r = 1)."""
    return min(order, steps - 1) if startup == "rk" and order >= 2 else 0


@lru_cache(maxsize=32)
def _cached_weights(schedule, t: tuple, order: int, method: str) -> tuple:
    # keyed on the schedule object (held here, so its identity is not reused) and the grid as floats: a sweep's cell
    # solves the same grid once per batch and pays the quadrature once (issue 17)
    return tuple(tuple(row) for row in deis_weights(schedule, list(t), order, method))


def deis_weights(schedule, t, order: int, method: str) -> list[list[float]]:
    """W[i][j] = int_{sigma_hat(t_i)}^{sigma_hat(t_{i+1})} l_j(v) d sigma_hat, l_j the Lagrange basis in v = METHODS[method]
    on v(t_i), v(t_{i-1}), ..., v(t_{i-k+1}), k = min(order, i) + 1 (eq. 16-17 divided by alpha(t_{i+1})).
    Composite Gauss-Legendre in u = log sigma_hat (d sigma_hat = e^u du), where t(u) is analytic within pi/2 of the
    real axis for VP schedules: pieces of width <= QUAD_WIDTH with QUAD_NODES nodes each, relative error ~1e-16."""
    t = torch.as_tensor(t, dtype=torch.float64)
    u_grid = (-schedule.lambda_(t)).tolist()                  # log sigma_hat at the grid points
    v_grid = {"t": t.tolist(), "sigma_hat": [math.exp(u) for u in u_grid], "lambda": [-u for u in u_grid]}[METHODS[method]]
    xg, wg = np.polynomial.legendre.leggauss(QUAD_NODES)
    us, ws, start = [], [], [0]                                # step i's nodes: u[start[i]:start[i + 1]]
    for i in range(len(u_grid) - 1):
        a, b = u_grid[i], u_grid[i + 1]
        m = max(1, math.ceil(abs(b - a) / QUAD_WIDTH))
        edges = np.linspace(a, b, m + 1)
        for lo, hi in zip(edges[:-1], edges[1:]):
            us.append((lo + hi) / 2 + (hi - lo) / 2 * xg)
            ws.append((hi - lo) / 2 * wg * np.exp(us[-1]))     # du -> d sigma_hat
        start.append(start[-1] + m * QUAD_NODES)
    u, w = np.concatenate(us), np.concatenate(ws)
    if METHODS[method] == "t":
        v = schedule.t_of_lambda(torch.from_numpy(-u)).numpy()
    else:
        v = np.exp(u) if METHODS[method] == "sigma_hat" else -u
    W = []
    for i in range(len(u_grid) - 1):
        vi, wi = v[start[i]:start[i + 1]], w[start[i]:start[i + 1]]
        nodes = [v_grid[i - j] for j in range(min(order, i) + 1)]
        row = []
        for j, vj in enumerate(nodes):
            lj = np.ones_like(vi)
            for m, vm in enumerate(nodes):
                if m != j:
                    lj *= (vi - vm) / (vj - vm)
            row.append(float((wi * lj).sum()))
        W.append(row)
    return W


def deis_sample(dyn, x, t, rng=None, order: int = 2, method: str = "tab", startup: str = "lower"):
    """DEIS tAB-r / rhoAB-r (Zhang & Chen 2023, eq. 16-17, in x_hat = x/alpha): one evaluation per grid point, the
    exponential-integrator weights of the grid computed once; then x0 at t[-1]."""
    _check(order, method, startup)
    W = _cached_weights(dyn.schedule, tuple(torch.as_tensor(t, dtype=torch.float64).tolist()), order, method)
    V = ODEVariable(dyn, "sigma_hat")                          # state x_hat, d x_hat / d sigma_hat = eps
    n_rk = _rk_steps(order, startup, len(t))
    s, pts, g = V.grid(t)                                      # the grid's coefficients, once per solve (issue 17)
    y = V.start(x, g)
    rk = rk_plan(V, STARTUP_TABLEAU[order + 1], s[:n_rk + 1], grid=pts[:n_rk + 1]) if n_rk else []
    hist = []                                                  # eps at t_i, t_{i-1}, ... (newest first)
    for i in range(len(t) - 1):
        eps, _ = V.deriv(pts[i], y)
        hist = [eps] + hist[:order]
        if i < n_rk:                                           # rhoRK start-up step of order r, first stage = eps
            y = rk_apply(V, rk[i], y, k0=eps)
            continue
        y = _axpy(y, enumerate(W[i]), hist)                    # x_hat_i + sum_j W_ij eps_{i-j}
    _, eps = V.deriv(pts[-1], y)
    return V.end(y, eps, g)


def _nfe(steps, order=2, method="tab", startup="lower", **_):
    _check(order, method, startup)
    stages = len(TABLEAUS[STARTUP_TABLEAU[order + 1]][1])
    return steps + (stages - 1) * _rk_steps(order, startup, steps)


def _order(order=2, startup="lower", **_):
    # the DDIM first step of the 'lower' warm-up leaves a local O(h^2) error: global order 2 (module docstring)
    return order + 1 if startup == "rk" else min(order + 1, 2)


def _end_evals(m, n, order=2, startup="lower", **_):
    # a Runge-Kutta start-up step (heun, rk3: last stage at c = 1) ends with an evaluation at its end point t[m]
    return int(1 <= m <= _rk_steps(order, startup, n))


register_solver("deis", nfe_of_steps=_nfe, nfe_formula="steps; startup=rk: order 2: steps + 2, order 3: steps + 6",
                min_steps=2, order=_order, default_timesteps="edm", end_evals=_end_evals)(deis_sample)
