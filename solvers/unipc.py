"""UniPC (Zhao et al. 2023), data-prediction form, multistep in lambda: the predictor UniP-p
(Alg. 2 / eq. 9) and the corrector UniC-p (Alg. 1 / eq. 8), which reuses the evaluation at the
predicted point, so the pair costs one NFE per step and has order p + 1 (their Theorem 3.1); with lower_order_final the last
interval is a UniP-min(p, 2) step without corrector, which caps the global order at 3 (see _order).
B(h) = h ('bh1') or e^h - 1 ('bh2').  Warm-up uses the orders the history allows; with
lower_order_final the last interval uses order <= 2 (diffusers' rule).  The final step is x0 at t[-1]
from the evaluation there (the first-order update to lambda = +inf), and no corrector follows it,
so NFE = steps.
"""
from __future__ import annotations

import math

from bench.solvers.exponential import _Grid
from bench.solvers.knobs import check_choice
from bench.solvers.lincomb import Lin, cached_weights, combine, solve_small
from bench.solvers.registry import register_solver

VARIANTS = ("bh1", "bh2")


def _rho_system(rks, h, order, variant):
    """R (rows rks^(i-1)) and b (b_i = i! phi_{i+1}(-h) h / B(h)) of UniPC's linear system (Zhao et al. 2023, eq. 8-9)."""
    hh = -h
    B_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1
    fact = 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append([rk ** (i - 1) for rk in rks])
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return R, b, B_h


def unipc_coefficients(g, i, order, variant, corrector=True):
    """The scalars of the UniP-order update from t_i to t_{i+1} and of its UniC-order correction: they depend on
    the grid only, so a solve computes them once per step before sampling (issue 17).  Returns
    (sigma ratio, a_t expm1(-h), a_t B(h), rks, predictor rhos, corrector rhos or None)."""
    lam_s0, lam_t = g.lam[i], g.lam[i + 1]
    h = lam_t - lam_s0
    _, _, s_s0 = g.point(i)
    _, a_t, s_t = g.point(i + 1)
    rks = [(g.lam[i - j] - lam_s0) / h for j in range(1, order)]
    R, b, B_h = _rho_system(rks + [1.0], h, order, variant)
    pred = [] if order == 1 else [0.5] if order == 2 else solve_small([r[:-1] for r in R[:-1]], b[:-1])
    corr = None if not corrector else [0.5] if order == 1 else solve_small(R, b)
    return s_t / s_s0, a_t * math.expm1(-h), a_t * B_h, rks, pred, corr


def unipc_update(g, x, i, hist, order, variant, m_new=None, coef=None):
    """UniP-order update from t_i to t_{i+1} (m_new None), or UniC-order correction of the point at t_{i+1}
    given m_new = x0-prediction there; hist = x0-predictions at t_i, t_{i-1}, ... (newest first); coef =
    unipc_coefficients(g, i, order, variant), computed here when not given."""
    ratio, lin, scale, rks, pred, corr = coef or unipc_coefficients(g, i, order, variant, m_new is not None)
    m0 = hist[0]
    D1s = [(hist[j] - m0) / rk for j, rk in zip(range(1, order), rks)]
    x_t = ratio * x - lin * m0
    if m_new is None:                                   # predictor UniP
        if order == 1:
            return x_t
        return x_t - scale * sum(r * d for r, d in zip(pred, D1s))
    res = sum(r * d for r, d in zip(corr[:-1], D1s)) + corr[-1] * (m_new - m0)     # corrector UniC
    return x_t - scale * res


def _check(order, variant, lower_order_final):
    check_choice("unipc", "order", order, (1, 2, 3))
    check_choice("unipc", "variant", variant, VARIANTS)
    check_choice("unipc", "lower_order_final", lower_order_final, (True, False))


def _unipc_weights(g, n, order, variant, lower_order_final):
    ks = [min(order, i + 1, 2 if lower_order_final and i == n - 2 else order) for i in range(n - 1)]
    coefs = [unipc_coefficients(g, i, k, variant, corrector=i < n - 2) for i, k in enumerate(ks)]
    # each step's weights, from the updates run on symbols once per grid (issue 17).  UniC and UniP of one step share
    # the weight on x, so the corrected x_i = x_pred_{i-1} + (UniC - UniP)(x0s); the loop never forms it and goes from
    # one predicted point to the next: Q_i on x_pred_{i-1} (symbol 0) and the x0s m_i, m_{i-1}, ... (1, 2, ...).
    X, M = Lin(0), [Lin(j + 1) for j in range(order + 1)]
    P0 = unipc_update(g, X, 0, M, ks[0], variant, coef=coefs[0]).terms((0,))
    Q = [None]
    for i in range(1, n - 1):
        kp, cp = ks[i - 1], coefs[i - 1]
        d = (unipc_update(g, X, i - 1, M[1:], kp, variant, m_new=M[0], coef=cp)
             - unipc_update(g, X, i - 1, M[1:], kp, variant, coef=cp))
        d.c.pop(0, None)                               # the x weights are the same float: their difference is 0
        Q.append(unipc_update(g, X + d, i, M, ks[i], variant, coef=coefs[i]).terms((0,)))
    # the loop holds alpha_j x0_j (x - sigma_j eps: no division per NFE), so the weight on x0_j becomes w / alpha_j
    P0 = [(k, c if k == 0 else c / g.alpha[1 - k]) for k, c in P0]
    Q = [None] + [[(k, c if k == 0 else c / g.alpha[i + 1 - k]) for k, c in q] for i, q in enumerate(Q) if i]
    return P0, Q


def unipc_sample(dyn, x, t, rng=None, order: int = 2, variant: str = "bh2", lower_order_final: bool = True):
    """UniPC-p: x_{i+1} = UniP(x_i), m_{i+1} = x0(x_{i+1}) (one NFE), x_{i+1} <- UniC(x_i, m_{i+1}); x0 at t[-1].
    The loop applies UniC of step i and UniP of step i + 1 as one combination (_unipc_weights)."""
    _check(order, variant, lower_order_final)
    g = _Grid(dyn.schedule, t)
    n = len(t)
    P0, Q = cached_weights((unipc_update, unipc_coefficients, g.key, order, variant, lower_order_final),
                           lambda: _unipc_weights(g, n, order, variant, lower_order_final))
    tf, sigma = g.tf, g.sigma
    # alpha x0 = x - sigma eps at t_i, t_{i-1}, ... (newest first): Dynamics.x0_at without its division by alpha,
    # which the weights carry (_unipc_weights); the one division left is the output's
    hist = [x.sub(dyn.eps(x, tf[0]), alpha=sigma[0])]
    x_pred = combine(P0, (x, *hist))
    for i in range(n - 1):
        if i:
            x_pred = combine(Q[i], (x_pred, *hist))    # UniC of step i - 1, then UniP of step i
        hist = [x_pred.sub(dyn.eps(x_pred, tf[i + 1]), alpha=sigma[i + 1])] + hist[:order]
    return hist[0].div_(g.alpha[n - 1])


def _nfe(steps, order=2, variant="bh2", lower_order_final=True, **_):
    _check(order, variant, lower_order_final)
    return steps


def _order(order=2, variant="bh2", lower_order_final=True, **_):
    # UniC-p makes every step order p + 1 (Zhao et al. 2023, Thm. 3.1); the last interval has no corrector, so its
    # UniP-k predictor (k = p, or min(p, 2) with lower_order_final) adds a local O(h^(k+1)) error once: order k + 1.
    return min(order, 2) + 1 if lower_order_final else order + 1


register_solver("unipc", nfe_of_steps=_nfe, nfe_formula="steps", min_steps=2,
                order=_order, default_timesteps="logsnr",
                end_evals=lambda m, n, **_: int(m < n - 1))(unipc_sample)   # the free evaluation ends a step
