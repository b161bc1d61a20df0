"""Exponential integrators in log-SNR lambda = log(alpha/sigma): DPM-Solver (noise prediction,
singlestep; Lu et al. 2022) and DPM-Solver++ (data prediction, multistep and singlestep; Lu et al.
2022b).  The linear part of the probability-flow ODE is solved exactly; the network term is
expanded in lambda.

Final step (DESIGN 'final step'): every update to sigma = 0 (lambda = +inf) of first order reduces to
the x0-prediction, so each solver ends with x0 at t[-1] from the evaluation there.  A multistep solver
has made that evaluation already as its history point at t[-1]; a singlestep one makes it for the
final step alone.
"""
from __future__ import annotations

import math

import torch

from bench.models.errors import ConfigError
from bench.solvers.knobs import check_choice
from bench.solvers.lincomb import Lin, cached_weights, combine
from bench.solvers.registry import register_solver
from bench.solvers.variables import grid_floats

LOWER_ORDER_FINAL_BELOW = 15     # as diffusers: lower_order_final acts when steps < 15
D2_SCALE = {"taylor": 2.0, "dpm_solver_code": 1.0}   # DPM-Solver++(3M): weight of D2 (see pp_multistep_update)


class _Grid:
    """lambda, alpha, sigma at the grid points, and the intermediate time at lambda_s + r h.  Computed once per
    solve (issue 17): the step loops read Python floats and do tensor arithmetic with the network's output only."""

    def __init__(self, schedule, t):
        self.sch, self.t = schedule, t
        # the grid as floats (dyn.eps's fast path), with lambda, alpha, sigma from one schedule evaluation
        self.tf, self.alpha, self.sigma, self.lam, self.sig_hat = grid_floats(schedule, t)
        self.key = (*self.tf, *self.alpha, *self.sigma, *self.lam)     # what per-step weights depend on (cached_weights)
        self._at = {}

    def prepare(self, lams):
        """Evaluate the schedule at the intermediate log-SNRs `lams` of a whole solve in one call (for `at`)."""
        lams = [lam for lam in dict.fromkeys(lams) if lam not in self._at]
        if lams:
            f = grid_floats(self.sch, self.sch.t_of_lambda(torch.tensor(lams, dtype=torch.float64)))
            for lam, ti, a, s in zip(lams, f.t, f.alpha, f.sigma):
                self._at[lam] = (ti, a, s)

    def at(self, lam):
        if lam not in self._at:
            self.prepare([lam])
        return self._at[lam]

    def point(self, i):
        return self.tf[i], self.alpha[i], self.sigma[i]

    def x0(self, dyn, x, i, eps=None):
        """x0-prediction at grid point i from the floats held here (Dynamics.x0_at: two fused tensor ops)."""
        return dyn.x0_at(x, self.tf[i], self.alpha[i], self.sigma[i], eps)


# ---------------------------------------------------------------- DPM-Solver (noise prediction)

DPM_STAGES = {1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}   # r of the intermediate points of DPM-Solver-k (dpm_solver_step)


def dpm_solver_coefficients(g, i, order):
    """The floats of one singlestep DPM-Solver-k update from t_i to t_{i+1} (dpm_solver_step): they depend on the grid
    only, so a solve computes them once per grid before sampling (issue 17)."""
    lam_s, lam_t = g.lam[i], g.lam[i + 1]
    h = lam_t - lam_s
    _, a_s, _ = g.point(i)
    _, a_t, s_t = g.point(i + 1)
    if order == 1:
        return (a_t / a_s, s_t * math.expm1(h))
    if order == 2:
        r1 = 0.5
        t1, a1, s1 = g.at(lam_s + r1 * h)
        # c = s_t expm1(h) / (2 r1) = s_t expm1(h) at r1 = 1/2: eps_s drops out of x_lin - c D1 (the midpoint method)
        return (a_t / a_s, s_t * math.expm1(h), t1, a1 / a_s, s1 * math.expm1(r1 * h))
    r1, r2 = 1 / 3, 2 / 3
    t1, a1, s1 = g.at(lam_s + r1 * h)
    t2, a2, s2 = g.at(lam_s + r2 * h)
    c1 = s2 * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1)
    c2 = s_t / r2 * (math.expm1(h) / h - 1)
    return (a_t / a_s, s_t * math.expm1(h) - c2, c2, t1, a1 / a_s, s1 * math.expm1(r1 * h),
            t2, a2 / a_s, s2 * math.expm1(r2 * h) - c1, c1)


def dpm_solver_step(dyn, g, x, i, order, eps_s, coef=None):
    """One singlestep DPM-Solver-k update from t_i to t_{i+1} (Lu et al. 2022, eq. 3.7 for k=1 (DDIM),
    Alg. 1 for k=2 with r1 = 1/2, Alg. 2 for k=3 with r1 = 1/3, r2 = 2/3); eps_s = eps(x, t_i); coef =
    dpm_solver_coefficients(g, i, order), computed here when not given.  x_lin - c D_k with D_k = eps_k - eps_s is
    applied as x (a_t/a_s) - (s_t expm1(h) - c) eps_s - c eps_k: the differences D_k are never formed (issue 17)."""
    c = coef or dpm_solver_coefficients(g, i, order)
    if order == 1:
        return x.mul(c[0]).sub_(eps_s, alpha=c[1])
    if order == 2:
        ratio, e, t1, r1, e1 = c
        return x.mul(ratio).sub_(dyn.eps(x.mul(r1).sub_(eps_s, alpha=e1), t1), alpha=e)
    ratio, e, c2, t1, r1, e1, t2, r2, e2, c1 = c
    u1 = x.mul(r1).sub_(eps_s, alpha=e1)
    u2 = x.mul(r2).sub_(eps_s, alpha=e2).sub_(dyn.eps(u1, t1), alpha=c1)
    return x.mul(ratio).sub_(eps_s, alpha=e).sub_(dyn.eps(u2, t2), alpha=c2)


def fast_orders(intervals):
    """DPM-Solver-fast's orders for K = intervals steps (Lu et al. 2022, sec. 3.4) with NFE N = 3K - 1,
    the largest N giving K steps: K - 1 third-order steps and one second-order step."""
    return [3] * (intervals - 1) + [2]


def paper_fast_orders(nfe, order=3):
    """DPM-Solver-fast's allocation of N = nfe evaluations (Lu et al. 2022, sec. 3.4; the reference code's
    get_orders_and_timesteps_for_singlestep_solver): order 3, N = 3q + r: r = 0 -> q - 1 third-order steps, then
    orders 2 and 1; r = 1 -> q third-order steps and one of order 1; r = 2 -> q third-order and one of order 2
    (NFE 10: [3, 3, 3, 1]); order 2: N // 2 second-order steps and one of order 1 if N is odd; order 1: N steps."""
    q, r = divmod(nfe, order)
    if order == 3:
        return [3] * (q - 1) + [2, 1] if r == 0 else [3] * q + [r]
    return [order] * q + [1] * r


DPM_FINALS = ("x0", "t_end")


def _int_like(v):
    return isinstance(v, int) and not isinstance(v, bool)


def dpm_allocation(order=3, fast=False, orders=None, fast_nfe=None, final="x0"):
    """Check dpm_solver's knobs; the per-interval orders they fix (orders, or fast_nfe's allocation), or None when
    the grid sets the number of intervals (order on each, or fast)."""
    check_choice("dpm_solver", "order", order, (1, 2, 3))
    check_choice("dpm_solver", "fast", fast, (True, False))
    check_choice("dpm_solver", "final", final, DPM_FINALS)
    given = [k for k, on in (("fast", fast), ("orders", orders is not None), ("fast_nfe", fast_nfe is not None)) if on]
    if len(given) > 1:
        raise ConfigError(f"solver 'dpm_solver': {' and '.join(given)} each choose the orders of the steps; give one "
                          f"of them (orders: an explicit list; fast_nfe: the paper's allocation of that NFE; fast).")
    if orders is not None:
        if isinstance(orders, (str, bytes, dict)) or not hasattr(orders, "__len__") or len(orders) == 0 \
                or not all(_int_like(k) and 1 <= k <= 3 for k in orders):
            raise ConfigError(f"solver 'dpm_solver': orders must be a non-empty list of orders 1, 2 or 3, one per "
                              f"interval (e.g. [3, 3, 3, 1]), or null; got {orders!r}.")
        return list(orders)
    if fast_nfe is not None:
        if not _int_like(fast_nfe) or fast_nfe < 1:
            raise ConfigError(f"solver 'dpm_solver': fast_nfe must be a positive integer (the paper's NFE whose "
                              f"DPM-Solver-fast allocation to use, e.g. 10 -> [3, 3, 3, 1]) or null; got {fast_nfe!r}.")
        return paper_fast_orders(fast_nfe, order)
    return None


def dpm_solver_sample(dyn, x, t, rng=None, order: int = 3, fast: bool = False, orders=None, fast_nfe=None,
                      final: str = "x0"):
    """Singlestep DPM-Solver-k on the grid t with the orders chosen by the knobs, then x0 at t[-1] (final 'x0',
    DESIGN's final step) or x at t[-1] as it stands (final 't_end': the paper's stop at t_end, no evaluation)."""
    alloc = dpm_allocation(order, fast, orders, fast_nfe, final)
    n_int = len(t) - 1
    if alloc is None:
        alloc = fast_orders(n_int) if fast else [order] * n_int
    elif len(alloc) != n_int:
        raise ConfigError(f"solver 'dpm_solver': the orders {alloc} need a grid of {len(alloc) + 1} points "
                          f"({len(alloc)} intervals), got {len(t)} (an explicit time list of another length?).")
    g = _Grid(dyn.schedule, t)

    def coefs():
        g.prepare([g.lam[i] + r * (g.lam[i + 1] - g.lam[i]) for i, k in enumerate(alloc) for r in DPM_STAGES[k]])
        return [dpm_solver_coefficients(g, i, k) for i, k in enumerate(alloc)]
    # once per grid (issue 17); the schedule is in the key, since the intermediate points lie between grid points
    C = cached_weights((dpm_solver_coefficients, g.sch, g.key, tuple(alloc)), coefs)
    for i, k in enumerate(alloc):
        x = dpm_solver_step(dyn, g, x, i, k, dyn.eps(x, g.tf[i]), C[i])
    return g.x0(dyn, x, n_int) if final == "x0" else x


def _dpm_nfe(steps, order=3, fast=False, orders=None, fast_nfe=None, final="x0", **_):
    alloc = dpm_allocation(order, fast, orders, fast_nfe, final)
    end = 1 if final == "x0" else 0
    if alloc is not None:        # the allocation fixes steps = len + 1: more grid points fit no budget
        return sum(alloc) + end if steps <= len(alloc) + 1 else math.inf
    return (3 * (steps - 1) - 1 if fast else order * (steps - 1)) + end


def _dpm_order(order=3, fast=False, orders=None, fast_nfe=None, **_):
    if orders is not None or fast_nfe is not None:
        return None              # a fixed allocation is not refined: no convergence order
    return 3 if fast else order


register_solver("dpm_solver", nfe_of_steps=_dpm_nfe,
                nfe_formula="order*(steps-1) + 1; fast: 3*(steps-1); orders/fast_nfe: sum(orders) + 1 with "
                            "steps = len(orders) + 1; final=t_end: 1 fewer",
                min_steps=2, order=_dpm_order, default_timesteps="logsnr",
                final_step_of=lambda final="x0", **_: "denoise" if final == "x0" else "t_end")(dpm_solver_sample)


# ---------------------------------------------------------------- DPM-Solver++ (data prediction)

def pp_multistep_update(g, x, i, x0_hist, order, d2="taylor"):
    """DPM-Solver++(kM) update from t_i to t_{i+1} from the x0-predictions at t_i, t_{i-1}, ... (newest first):
    k=1 eq. (5) of Lu et al. 2022b; k=2 their Alg. 2; k=3 their eq. (8) with x0 expanded to second order,
    h x0' ~ D1 and h^2 x0'' ~ 2 D2 by divided differences.  d2='dpm_solver_code' uses D2 where 2 D2 belongs, as
    the DPM-Solver reference code and diffusers do: that update is exact only for linear x0(lambda), so its
    global order is 2 (see README, Solvers)."""
    lam_t, lam_s0 = g.lam[i + 1], g.lam[i]
    h = lam_t - lam_s0
    _, _, s_s0 = g.point(i)
    _, a_t, s_t = g.point(i + 1)
    m0 = x0_hist[0]
    x_t = (s_t / s_s0) * x - (a_t * math.expm1(-h)) * m0
    if order == 1:
        return x_t
    r0 = (lam_s0 - g.lam[i - 1]) / h
    D1_0 = (1 / r0) * (m0 - x0_hist[1])
    if order == 2:
        return x_t - (0.5 * a_t * math.expm1(-h)) * D1_0
    r1 = (g.lam[i - 1] - g.lam[i - 2]) / h
    D1_1 = (1 / r1) * (x0_hist[1] - x0_hist[2])
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1 / (r0 + r1)) * (D1_0 - D1_1)
    phi2 = math.expm1(-h) / h + 1
    phi3 = phi2 / h - 0.5
    return x_t + (a_t * phi2) * D1 - (a_t * phi3 * D2_SCALE[d2]) * D2


def pp_singlestep2_update(dyn, g, x, i, x0_s, r=0.5):
    """DPM-Solver++(2S) update from t_i to t_{i+1} (Lu et al. 2022b, Alg. 1, r = 1/2)."""
    lam_s, lam_t = g.lam[i], g.lam[i + 1]
    h = lam_t - lam_s
    _, _, s_s = g.point(i)
    _, a_t, s_t = g.point(i + 1)
    t1, a1, s1 = g.at(lam_s + r * h)
    u = x.mul(s1 / s_s).sub_(x0_s, alpha=a1 * math.expm1(-r * h))
    D = dyn.x0_at(u, t1, a1, s1).mul_(1 / (2 * r)).add_(x0_s, alpha=1 - 1 / (2 * r))
    return x.mul(s_t / s_s).sub_(D, alpha=a_t * math.expm1(-h))


def _check_pp(order, method, lower_order_final, d2="dpm_solver_code"):
    check_choice("dpm_solver_pp", "method", method, ("multistep", "singlestep"))
    check_choice("dpm_solver_pp", "d2", d2, tuple(D2_SCALE))
    check_choice("dpm_solver_pp", "order", order, (1, 2, 3) if method == "multistep" else (1, 2))
    check_choice("dpm_solver_pp", "lower_order_final", lower_order_final, (True, False))


def multistep_order(order, i, steps, lower_order_final):
    """Order of the update from t_i: warm-up min(order, i+1); with lower_order_final and steps < 15 the last
    interval uses at most order 2 (diffusers' rule; the final step to sigma=0 is always first order)."""
    k = min(order, i + 1)
    if lower_order_final and steps < LOWER_ORDER_FINAL_BELOW and i == steps - 2:
        k = min(k, 2)
    return k


def dpm_solver_pp_sample(dyn, x, t, rng=None, order: int = 2, method: str = "multistep",
                         lower_order_final: bool = True, d2: str = "dpm_solver_code"):
    """DPM-Solver++ 2M/3M (multistep, NFE = steps) or 2S (singlestep, NFE = 2*steps - 1), then x0 at t[-1]."""
    _check_pp(order, method, lower_order_final, d2)
    g = _Grid(dyn.schedule, t)
    n = len(t)
    if method == "singlestep":
        if order == 2:
            g.prepare([g.lam[i] + 0.5 * (g.lam[i + 1] - g.lam[i]) for i in range(n - 1)])
        W = [pp_multistep_update(g, Lin(0), i, [Lin(1)], 1).terms((0,)) for i in range(n - 1)]
        for i in range(n - 1):
            x0_s = g.x0(dyn, x, i)
            x = pp_singlestep2_update(dyn, g, x, i, x0_s) if order == 2 else combine(W[i], (x, x0_s))
        return g.x0(dyn, x, n - 1)
    # each step's weights on x and the x0 history, from the update formula run on symbols once per solve (issue 17)
    W = cached_weights((pp_multistep_update, g.key, order, lower_order_final, d2), lambda: [
        pp_multistep_update(g, Lin(0), i, [Lin(1), Lin(2), Lin(3)], multistep_order(order, i, n, lower_order_final),
                            d2).terms((0,)) for i in range(n - 1)])
    hist = []
    for i in range(n - 1):
        hist = [g.x0(dyn, x, i)] + hist[:2]
        x = combine(W[i], (x, *hist))
    return g.x0(dyn, x, n - 1)


def _pp_nfe(steps, order=2, method="multistep", lower_order_final=True, d2="dpm_solver_code", **_):
    _check_pp(order, method, lower_order_final, d2)
    return steps if method == "multistep" or order == 1 else 2 * steps - 1


register_solver("dpm_solver_pp", nfe_of_steps=_pp_nfe,
                nfe_formula="multistep: steps; singlestep (2S): 2*steps - 1", min_steps=2,
                order=lambda order=2, method="multistep", d2="dpm_solver_code", **_: 2 if (order == 3 and d2 != "taylor") else order,
                default_timesteps="logsnr")(dpm_solver_pp_sample)
