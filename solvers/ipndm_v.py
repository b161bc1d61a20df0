"""iPNDM with variable steps ('ipndm_v', the variable-step iPNDM of zju-pi/diff-sampler, used as a baseline by
Zhou et al. 2024, "Fast ODE-based sampling for diffusion models in around 5 steps"): a linear multistep method in
sigma_hat (d x_hat / d sigma_hat = eps), one NFE per step, warm-up with the orders the history allows (Euler first),
then the x0-prediction at t[-1] from the evaluation there (DESIGN 'final step').

Its weights (ipndm_v_coefficients), in Newton form with h = h_n and h_k = s_{n-k+1} - s_{n-k}:
    x_hat_{n+1} = x_hat_n + h [f_n + (h/h_1)/2 (f_n - f_{n-1}) + a_3 D_2 + a_4 D_3],
    D_2 = (f_n - f_{n-1}) - (h_1/h_2)(f_{n-1} - f_{n-2}) = h_1 (h_1 + h_2) f[n, n-1, n-2],
    D_3 = D_2 - X ((f_{n-1} - f_{n-2}) - (h_2/h_3) f_{n-2} + (h_1/h_2) f_{n-3}),  X = h_1 (h_1 + h_2) / (h_2 (h_2 + h_3)),
with a_3, a_4 the factors below.  Orders 1 and 2 are Euler and variable-step Adams-Bashforth 2 (solver ab, order 1, 2).
Order 3 meets the order conditions up to 2 exactly and the third only on uniform steps (there it is AB3 = iPNDM-3),
with an O(h) defect on a smooth grid: third order but for the start-up.  Order 4 is not Adams-Bashforth 4: on
uniform steps a_4 = 11/24 where AB4 has 3/8 (weights 57, -65, 43, -11 over 24: third order), and D_3's last term
has h_1/h_2 where a third divided difference needs h_2/h_3, so the weights sum to 1 + a_4 X (h_2/h_3 - h_1/h_2):
consistent only on geometric grids (logsnr), an O(h^3) local defect on others (edm): global order 2.  The Euler
first step caps every order >= 2 at 2 anyway (solvers/multistep.py, startup 'lower').
"""
from __future__ import annotations

from bench.solvers.knobs import check_choice
from bench.solvers.lincomb import cached_weights
from bench.solvers.registry import register_solver
from bench.solvers.rk import _axpy
from bench.solvers.variables import ODEVariable

ORDERS = (1, 2, 3, 4)


def ipndm_v_coefficients(h):
    """Weights w (newest first) with x_hat_{n+1} = x_hat_n + h[0] sum_j w_j f_{n-j}; h = [h_n, h_{n-1}, ...]
    (sigma_hat steps, newest first), len(h) = the order of the step (diff-sampler's ipndm_v_sampler)."""
    k = len(h)
    if k == 1:
        return [1.0]
    r = h[0] / h[1]
    w = [1 + r / 2, -r / 2]
    if k == 2:
        return w
    h0, h1, h2 = h[:3]
    a3 = (1 - h0 / (3 * (h0 + h1)) * h0 * (h0 + h1) / (h1 * (h1 + h2))) / 2
    d2 = [1.0, -(1 + h1 / h2), h1 / h2]                        # D_2 on f_n, f_{n-1}, f_{n-2}
    w = [w[0] + a3 * d2[0], w[1] + a3 * d2[1], a3 * d2[2]]
    if k == 3:
        return w
    h3 = h[3]
    a4 = (((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2)))
          * h0 * (h0 + h1) * (h0 + h1 + h2) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    X = h1 * (h1 + h2) / (h2 * (h2 + h3))
    d3 = [1.0, -(1 + h1 / h2 + X), h1 / h2 + X * (1 + h2 / h3), -X * h1 / h2]
    return [w[0] + a4 * d3[0], w[1] + a4 * d3[1], w[2] + a4 * d3[2], a4 * d3[3]]


def _weights(s, order):
    """Step n's weights h_n w_j on eps at s_n, s_{n-1}, ... (newest first): a function of the sigma_hat grid only."""
    hw = []
    for n in range(len(s) - 1):
        h = [s[n + 1 - j] - s[n - j] for j in range(min(order, n + 1))]
        hw.append([(j, h[0] * wj) for j, wj in enumerate(ipndm_v_coefficients(h))])
    return hw


def ipndm_v_sample(dyn, x, t, rng=None, order: int = 4):
    """Variable-step iPNDM of order `order` in sigma_hat (warm-up with lower orders); then x0 at t[-1]."""
    check_choice("ipndm_v", "order", order, ORDERS)
    V = ODEVariable(dyn, "sigma_hat")
    s, pts, g = V.grid(t)                                      # the grid's coefficients, once per solve (issue 17)
    y = V.start(x, g)
    hw = cached_weights((ipndm_v_coefficients, tuple(s), order), lambda: _weights(s, order))   # once per grid
    hist = []                                                  # eps at s_n, s_{n-1}, ... (newest first)
    for n in range(len(t) - 1):
        d, _ = V.deriv(pts[n], y)
        hist = [d] + hist[:order - 1]
        y = _axpy(y, hw[n], hist)
    _, eps = V.deriv(pts[-1], y)
    return V.end(y, eps, g)


def _nfe(steps, order=4, **_):
    check_choice("ipndm_v", "order", order, ORDERS)
    return steps


def _order(order=4, **_):
    # the Euler first step (and, for order 4, the weights' consistency defect on non-geometric grids): module docstring
    return min(order, 2)


register_solver("ipndm_v", nfe_of_steps=_nfe, nfe_formula="steps", min_steps=2, order=_order,
                default_timesteps="edm")(ipndm_v_sample)
