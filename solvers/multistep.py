"""Linear multistep methods: Adams-Bashforth of order 1..4 and iPNDM (one NFE per step).

AB-k integrates the interpolating polynomial through the last k derivatives over the next step
(Hairer, Norsett & Wanner, sec. III.1, eq. 1.5), with variable-step coefficients so it keeps order k
on any grid.  iPNDM (Zhang & Chen 2023, DEIS, eq. 24) uses the fixed-step AB coefficients.  Both
integrate in the EDM variable sigma_hat by default; the final step is the x0-prediction at t[-1] from
the evaluation there.

Start-up (knob `startup`): the first k-1 steps have no full history.
- 'lower' (default, as iPNDM, DEIS and diff-sampler): they use the orders the history allows (Euler first),
  one NFE each, so NFE = steps.  The Euler step's local error O(h^2 y'') limits the global order to 2.  It
  shows late where the solution is nearly linear at the start (in sigma_hat, y'' = d eps/d sigma_hat ~
  sigma_data^2 / sigma_hat^3 at sigma_hat(T) >> sigma_data: AB-4 measures 3.9 at NFE 512-1024 on gmm), and early
  in t and lambda (AB-4 in t: 2.0 at NFE 1024-4096).  It is the default because it is the more accurate at the
  budgets users run: on gmm, AB-3 / AB-4 with 'rk' have 1.2-1.5x / 1.9-3x the error of 'lower' at NFE 8-30.
- 'rk': they are Runge-Kutta steps of order k-1 (heun for k = 3, Kutta's rk3 for k = 4;
  Hairer, Norsett & Wanner, sec. III.1, "starting procedures"), whose first stage is the history's
  evaluation, so the global order is k in every variable, at NFE = steps + (stages - 1) per start-up step
  (k = 3: steps + 2, k = 4: steps + 6).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from bench.models.errors import ConfigError
from bench.solvers.knobs import check_choice
from bench.solvers.registry import register_solver
from bench.solvers.rk import TABLEAUS, _axpy, rk_apply, rk_plan
from bench.solvers.variables import VARIABLES, ODEVariable

ORDERS = (1, 2, 3, 4)
STARTUPS = ("lower", "rk")
STARTUP_TABLEAU = {1: "euler", 2: "euler", 3: "heun", 4: "rk3"}   # order k -> RK of order k-1 for the start-up
# Fixed-step Adams-Bashforth coefficients, newest derivative first (iPNDM, DEIS eq. 24).
IPNDM_COEFFS = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
                4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


@lru_cache(maxsize=None)
def _gauss_legendre_01(k):
    """Gauss-Legendre nodes and weights on [0, 1] as Python floats."""
    xg, wg = np.polynomial.legendre.leggauss(k)
    return tuple(((xg + 1) / 2).tolist()), tuple((wg / 2).tolist())


def ab_coefficients(s_hist, s_next):
    """Weights w_j with  int_{s_n}^{s_next} p(s) ds = h * sum_j w_j f_j,  p interpolating (s_hist[j], f_j),
    s_hist newest first (variable-step Adams-Bashforth).  Plain Python floats: k <= 4 nodes, no array calls."""
    s_hist = [float(v) for v in s_hist]
    h = float(s_next) - s_hist[0]
    z = [(v - s_hist[0]) / h for v in s_hist]         # nodes in units of the step: 0, -r1, ...
    k = len(z)
    xg, wg = _gauss_legendre_01(max(k, 1))            # Gauss-Legendre on [0, 1], exact to degree 2k-1
    w = []
    for j in range(k):
        total = 0.0
        for x, wx in zip(xg, wg):
            lj = wx
            for m in range(k):
                if m != j:
                    lj *= (x - z[m]) / (z[j] - z[m])
            total += lj
        w.append(total)
    return w


def _check(order, ipndm, startup="lower", variable="sigma_hat"):
    check_choice("ab", "order", order, ORDERS)
    check_choice("ab", "ipndm", ipndm, (True, False))
    check_choice("ab", "startup", startup, STARTUPS)
    if variable not in VARIABLES:
        raise ConfigError(f"solver 'ab': unknown integration variable '{variable}'. Valid variables are: "
                          f"{', '.join(VARIABLES)}.")


def _startup_steps(order, startup, steps, ipndm=False):
    """How many of the steps - 1 intervals are Runge-Kutta start-up steps."""
    return min(order - 1, steps - 1) if startup == "rk" and order > 2 else 0


def ab_sample(dyn, x, t, rng=None, order: int = 2, ipndm: bool = False, variable: str = "sigma_hat",
              startup: str = "lower"):
    """Adams-Bashforth order k (variable-step), or iPNDM (fixed-step coefficients); start-up as `startup` says."""
    _check(order, ipndm, startup, variable)
    V = ODEVariable(dyn, variable)
    n_rk = _startup_steps(order, startup, len(t), ipndm)
    # what depends on the grid only, once per solve (issue 17): the points where the derivative is evaluated, the
    # start-up steps' Runge-Kutta plans, and each Adams step's weights h w_j
    s, pts, g = V.grid(t)
    y = V.start(x, g)
    rk = rk_plan(V, STARTUP_TABLEAU[order], s[:n_rk + 1], grid=pts[:n_rk + 1]) if n_rk else []
    hw = [None] * n_rk
    for n in range(n_rk, len(t) - 1):
        k, h = min(order, n + 1), s[n + 1] - s[n]
        w = IPNDM_COEFFS[k] if ipndm else ab_coefficients(s[n - k + 1:n + 1][::-1], s[n + 1])
        hw.append([float(h * wj) for wj in w])
    hist = []                                          # derivatives, newest first
    for n in range(len(t) - 1):
        d, _ = V.deriv(pts[n], y)
        hist = [d] + hist[:order - 1]
        if n < n_rk:                                   # Runge-Kutta start-up step of order k-1, first stage = d
            y = rk_apply(V, rk[n], y, k0=d)
            continue
        y = _axpy(y, enumerate(hw[n]), hist)             # y + sum_j h w_j f_{n-j}
    _, eps = V.deriv(pts[-1], y)
    return V.end(y, eps, g)


def _nfe(steps, order=2, ipndm=False, startup="lower", variable="sigma_hat", **_):
    _check(order, ipndm, startup, variable)
    stages = len(TABLEAUS[STARTUP_TABLEAU[order]][1])
    return steps + (stages - 1) * _startup_steps(order, startup, steps, ipndm)


def _order(order=2, ipndm=False, startup="lower", **_):
    # iPNDM's fixed coefficients on a non-uniform grid leave an O(h^2 * (h_n - h_{n-1})) local term, and an Euler
    # start-up step an O(h^2) one: either caps the global order at 2 (module docstring).
    return order if (startup == "rk" and not ipndm) else min(order, 2)


def _end_evals(m, n, order=2, startup="lower", ipndm=False, **_):
    # a Runge-Kutta start-up step (heun, rk3: last stage at c = 1) ends with an evaluation at its end point t[m]
    return int(1 <= m <= _startup_steps(order, startup, n, ipndm))


register_solver("ab", nfe_of_steps=_nfe, nfe_formula="steps; startup=rk: order 3: steps + 2, order 4: steps + 6",
                min_steps=2, order=_order, default_timesteps="edm", end_evals=_end_evals)(ab_sample)
