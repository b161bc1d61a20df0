"""Linear multistep methods: Adams-Bashforth of order 1..4 and iPNDM (one NFE per step).

AB-k integrates the interpolating polynomial through the last k derivatives over the next step
(Hairer, Norsett & Wanner, sec. III.1, eq. 1.5), with variable-step coefficients so it keeps order k
on any grid; the first k-1 steps use the orders the history allows.  iPNDM (Zhang & Chen 2023, DEIS,
eq. 24) uses the fixed-step AB coefficients with the same lower-order warm-up.  Both integrate in
the EDM variable sigma_hat by default; the final step is the x0-prediction at t[-1] from the
evaluation there, so NFE = steps.
"""
from __future__ import annotations

import numpy as np

from bench.solvers.knobs import check_choice
from bench.solvers.registry import register_solver
from bench.solvers.variables import ODEVariable

ORDERS = (1, 2, 3, 4)
# Fixed-step Adams-Bashforth coefficients, newest derivative first (iPNDM, DEIS eq. 24).
IPNDM_COEFFS = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
                4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def ab_coefficients(s_hist, s_next):
    """Weights w_j with  int_{s_n}^{s_next} p(s) ds = h * sum_j w_j f_j,  p interpolating (s_hist[j], f_j),
    s_hist newest first (variable-step Adams-Bashforth)."""
    s_hist = np.asarray(s_hist, dtype=np.float64)
    h = s_next - s_hist[0]
    z = (s_hist - s_hist[0]) / h                      # nodes in units of the step: 0, -r1, ...
    k = len(z)
    xg, wg = np.polynomial.legendre.leggauss(max(k, 1))
    xg, wg = (xg + 1) / 2, wg / 2                      # Gauss-Legendre on [0, 1], exact to degree 2k-1
    w = np.empty(k)
    for j in range(k):
        lj = np.ones_like(xg)
        for m in range(k):
            if m != j:
                lj *= (xg - z[m]) / (z[j] - z[m])
        w[j] = (wg * lj).sum()
    return w


def _check(order, ipndm):
    check_choice("ab", "order", order, ORDERS)
    check_choice("ab", "ipndm", ipndm, (True, False))


def ab_sample(dyn, x, t, rng=None, order: int = 2, ipndm: bool = False, variable: str = "sigma_hat"):
    """Adams-Bashforth order k (variable-step), or iPNDM (fixed-step coefficients), with lower-order start-up."""
    _check(order, ipndm)
    V = ODEVariable(dyn, variable)
    s = V.s_of_t(t).tolist()
    y = V.to_state(x, t[0])
    hist = []                                          # derivatives, newest first
    for n in range(len(t) - 1):
        d, _ = V.deriv(s[n], y)
        hist = [d] + hist[:order - 1]
        k = len(hist)
        h = s[n + 1] - s[n]
        w = IPNDM_COEFFS[k] if ipndm else ab_coefficients(s[n - k + 1:n + 1][::-1], s[n + 1])
        y = y + sum(float(h * wj) * dj for wj, dj in zip(w, hist))
    _, eps = V.deriv(s[-1], y)
    return dyn.x0(V.to_x(y, t[-1]), t[-1], eps=eps)


def _nfe(steps, order=2, ipndm=False, **_):
    _check(order, ipndm)
    return steps


def _order(order=2, ipndm=False, **_):
    # iPNDM's fixed coefficients on a non-uniform grid leave an O(h^2 * (h_n - h_{n-1})) local term: global order <= 2.
    return min(order, 2) if ipndm else order


register_solver("ab", nfe_of_steps=_nfe, nfe_formula="steps", min_steps=2, order=_order,
                default_timesteps="edm")(ab_sample)
