"""Stochastic multistep exponential integrators in log-SNR lambda with data prediction: DPM-Solver++ SDE (2M/3M) and
SA-Solver.

Both discretise the family of reverse SDEs with the data's marginals (Xue et al. 2023, the variance-controlled
diffusion SDE; eta = tau^2 in k-diffusion's DPM-Solver++ SDE)
    dx = [f x - (1 + tau^2)/2 g^2 score] dt + tau g dW-bar,
tau = 1 the reverse SDE (Song et al. 2021, eq. 6), tau = 0 the probability-flow ODE.  With tau constant over a step
lambda_s -> lambda_t, h = lambda_t - lambda_s, H = (1 + tau^2) h, variation of constants gives
    x_t = (sigma_t/sigma_s) e^{-tau^2 h} x_s + alpha_t int_0^h (1 + tau^2) e^{-(1 + tau^2)(h - u)} x0(lambda_s + u) du
          + sigma_t sqrt(1 - e^{-2 tau^2 h}) z,
z standing for the step's normalised Brownian increment, so both solvers draw all their noise with rng.increment
(`brownian`).  DPM-Solver++ SDE expands x0 in lambda with the multistep divided differences (phi functions at H);
SA-Solver replaces x0 by the Lagrange polynomial through past x0-predictions (predictor) or through those and the new
one (corrector) and integrates it exactly.  With tau = 0 both are deterministic multistep methods (README, Solvers).

Final step (DESIGN): x0 at t[-1] from the evaluation there, which each makes anyway: NFE = steps.
"""
from __future__ import annotations

import math

from bench.models.errors import ConfigError
from bench.solvers.exponential import D2_SCALE, _Grid, multistep_order
from bench.solvers.knobs import check_choice
from bench.solvers.lincomb import Lin, cached_weights, combine, solve_small
from bench.solvers.registry import register_solver


def _check_number(solver, knob, v, lo=0.0, allow_inf=False):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) and v >= lo \
        and (allow_inf or math.isfinite(v))
    if not ok:
        raise ConfigError(f"solver '{solver}': {knob} must be a {'' if allow_inf else 'finite '}number >= {lo:g}, "
                          f"got {v!r}")
    return float(v)


# ------------------------------------------------------------------------------------------- DPM-Solver++ SDE
SOLVER_TYPES = ("midpoint", "heun")


def _check_pp_sde(order, eta, solver_type, d2, lower_order_final):
    check_choice("dpm_solver_pp_sde", "order", order, (2, 3))
    _check_number("dpm_solver_pp_sde", "eta", eta)
    check_choice("dpm_solver_pp_sde", "solver_type", solver_type, SOLVER_TYPES)
    check_choice("dpm_solver_pp_sde", "d2", d2, tuple(D2_SCALE))
    check_choice("dpm_solver_pp_sde", "lower_order_final", lower_order_final, (True, False))


def pp_sde_update(g, x, i, x0_hist, order, eta, solver_type="midpoint", d2="taylor", z=None):
    """SDE-DPM-Solver++(kM) step t_i -> t_{i+1} (Lu et al. 2022b's SDE-DPM-Solver++ for eta = 1; k-diffusion's
    sample_dpmpp_2m_sde / 3m_sde for eta): the exact solution above with x0 expanded to order k - 1 in lambda,
    h x0' ~ D1 and h^2 x0'' ~ 2 D2 (d2='taylor'; 'dpm_solver_code' weights D2 by 1, as k-diffusion's 3M SDE).
    solver_type: 'heun' integrates the linear term exactly (phi_2(H) D1), 'midpoint' weights D1 by (1 - e^{-H})/2
    (Lu et al. 2022b, Alg. 2 at eta = 0).  x0_hist newest first; z the step's normalised Brownian increment."""
    lam_t, lam_s0 = g.lam[i + 1], g.lam[i]
    h = lam_t - lam_s0
    H = (1.0 + eta) * h
    _, _, s_s0 = g.point(i)
    _, a_t, s_t = g.point(i + 1)
    m0 = x0_hist[0]
    one_minus = -math.expm1(-H)                              # 1 - e^{-H}
    x_t = (s_t / s_s0 * math.exp(-eta * h)) * x + (a_t * one_minus) * m0
    if order >= 2:
        phi2 = math.expm1(-H) / H + 1.0                      # int_0^1 H e^{-H(1-v)} v dv
        r0 = (lam_s0 - g.lam[i - 1]) / h
        D1_0 = (1.0 / r0) * (m0 - x0_hist[1])
        if order == 2:
            w = 0.5 * one_minus if solver_type == "midpoint" else phi2
            x_t = x_t + (a_t * w) * D1_0
        else:
            r1 = (g.lam[i - 1] - g.lam[i - 2]) / h
            D1_1 = (1.0 / r1) * (x0_hist[1] - x0_hist[2])
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
            phi3 = phi2 / H - 0.5
            x_t = x_t + (a_t * phi2) * D1 - (a_t * phi3 * D2_SCALE[d2]) * D2
    if z is not None:
        x_t = x_t + (s_t * math.sqrt(-math.expm1(-2.0 * eta * h))) * z
    return x_t


def dpm_solver_pp_sde(dyn, x, t, rng, order: int = 2, eta: float = 1.0, solver_type: str = "midpoint",
                      d2: str = "dpm_solver_code", lower_order_final: bool = True):
    """DPM-Solver++(2M/3M) SDE: one evaluation per grid point, warm-up orders min(order, i + 1), with
    lower_order_final the last interval of order <= 2 when steps < 15 (as dpm_solver_pp); x0 at t[-1].  eta = 0 is
    dpm_solver_pp (2M: solver_type midpoint; 3M: midpoint warm-up, the same d2 and lower_order_final)."""
    _check_pp_sde(order, eta, solver_type, d2, lower_order_final)
    g = _Grid(dyn.schedule, t)
    n = len(t)
    # each step's weights on x (symbol 0), the x0 history (1, 2, 3) and the increment z (-1): the update run on symbols
    # once per solve (issue 17)
    W = cached_weights((pp_sde_update, g.key, order, eta, solver_type, d2, lower_order_final), lambda: [
        pp_sde_update(g, Lin(0), i, [Lin(1), Lin(2), Lin(3)], multistep_order(order, i, n, lower_order_final), eta,
                      solver_type, d2, Lin(-1) if eta > 0 else None).terms((0,)) for i in range(n - 1)])
    hist = []
    for i in range(n - 1):
        hist = [g.x0(dyn, x, i)] + hist[:2]
        z = rng.increment(x, g.tf[i], g.tf[i + 1]) if eta > 0 else None
        x = combine(W[i], (x, *hist, z))
    return g.x0(dyn, x, n - 1)


def _pp_sde_nfe(steps, order=2, eta=1.0, solver_type="midpoint", d2="dpm_solver_code", lower_order_final=True, **_):
    _check_pp_sde(order, eta, solver_type, d2, lower_order_final)
    return steps


register_solver("dpm_solver_pp_sde", nfe_of_steps=_pp_sde_nfe, nfe_formula="steps", min_steps=2, stochastic=True,
                brownian=True, default_timesteps="logsnr")(dpm_solver_pp_sde)


# ------------------------------------------------------------------------------------------------- SA-Solver
SA_ORDERS = (1, 2, 3, 4)                 # as diffusers' SASolverScheduler; corrector 0 = SA-Predictor alone
SA_ORDER2 = ("sa_solver_code", "lagrange")
SA_TAU_SIGMA = (0.72, 25.1)              # the paper's t in [0.2, 0.8] on a linear-beta VP: sigma_hat 0.7204..25.11


def exp_moments(H, n):
    """J_k = int_0^1 H e^{-H(1-v)} v^k dv, k < n: a power series for H < 1 (J_k = H sum_m (-H)^m k!/(m+k+1)!),
    else J_0 = 1 - e^{-H}, J_k = 1 - (k/H) J_{k-1} (integration by parts), both free of cancellation there."""
    if H < 1.0:
        out = []
        for k in range(n):
            term, total, m = H * math.factorial(k) / math.factorial(k + 1), 0.0, 0
            while abs(term) > 1e-18 * abs(total) or m < 2:
                total += term
                m += 1
                term *= -H / (m + k + 1)
            out.append(total)
        return out
    out = [-math.expm1(-H)]
    for k in range(1, n):
        out.append(1.0 - k / H * out[-1])
    return out


def sa_weights(nodes, H, order2="sa_solver_code"):
    """Weights w_j with sum_j w_j v_j^k = J_k (k < len(nodes)), nodes v_j = (lambda_j - lambda_s)/h: the exact integral
    of the Lagrange interpolant through (v_j, x0_j) against the SDE's kernel (Xue et al. 2023, SA-Predictor /
    SA-Corrector coefficients in data prediction).  order2='sa_solver_code': with two nodes J_1 becomes its leading term
    H/2, the O(h^3) change of the SA-Solver code (diffusers' SASolverScheduler); at tau = 0 it is UniPC's B(h) = h."""
    J = exp_moments(H, len(nodes))
    if len(nodes) == 2 and order2 == "sa_solver_code":
        J[1] = 0.5 * H
    return solve_small([[v ** k for v in nodes] for k in range(len(nodes))], J)     # Vandermonde system, k <= 4


def sa_update(g, x, i, lams, x0s, tau, z=None, order2="sa_solver_code"):
    """x at t_{i+1} from x at t_i, the x0-predictions x0s at log-SNRs lams (the interpolation nodes), tau on the step
    and its increment z: the exact solution above with x0 replaced by its Lagrange interpolant."""
    h = g.lam[i + 1] - g.lam[i]
    _, _, s_s = g.point(i)
    _, a_t, s_t = g.point(i + 1)
    w = sa_weights([(lam - g.lam[i]) / h for lam in lams], (1.0 + tau * tau) * h, order2)
    x_t = (s_t / s_s * math.exp(-tau * tau * h)) * x + a_t * sum(wj * mj for wj, mj in zip(w, x0s))
    if z is not None:
        x_t = x_t + (s_t * math.sqrt(-math.expm1(-2.0 * tau * tau * h))) * z
    return x_t


def _check_sa(predictor_order, corrector_order, tau, tau_sigma_min, tau_sigma_max, order2):
    check_choice("sa_solver", "predictor_order", predictor_order, SA_ORDERS)
    check_choice("sa_solver", "corrector_order", corrector_order, (0, *SA_ORDERS))
    _check_number("sa_solver", "tau", tau)
    lo = _check_number("sa_solver", "tau_sigma_min", tau_sigma_min)
    hi = _check_number("sa_solver", "tau_sigma_max", tau_sigma_max, allow_inf=True)
    if not lo <= hi:
        raise ConfigError(f"solver 'sa_solver': need tau_sigma_min <= tau_sigma_max (the sigma_hat range where tau "
                          f"applies), got {lo} > {hi}")
    check_choice("sa_solver", "order2", order2, SA_ORDER2)


def sa_solver(dyn, x, t, rng, predictor_order: int = 3, corrector_order: int = 4, tau: float = 1.0,
              tau_sigma_min: float = SA_TAU_SIGMA[0], tau_sigma_max: float = SA_TAU_SIGMA[1],
              order2: str = "sa_solver_code"):
    """SA-Solver (Xue et al. 2023): SA-Predictor of order p (p nodes: t_i, t_{i-1}, ...) to t_{i+1}, the evaluation
    there, then the SA-Corrector of order c (c nodes: t_{i+1}, t_i, ...) from t_i again with the same tau and increment
    z; the next step reuses that evaluation (as UniC), none follows the last step.  Warm-up orders min(p, i + 1),
    min(c, i + 2).  tau applies on steps starting at sigma_hat in [tau_sigma_min, tau_sigma_max], else 0."""
    _check_sa(predictor_order, corrector_order, tau, tau_sigma_min, tau_sigma_max, order2)
    g = _Grid(dyn.schedule, t)
    sig = g.sig_hat
    n = len(t)
    keep = max(predictor_order, corrector_order - 1, 1)
    # each step's weights on x (symbol 0), the increment z (1), the new x0 (2) and the x0 history (3, 4, ...): the
    # updates run on symbols once per solve (issue 17)
    X, Z, NEW, M = Lin(0), Lin(1), Lin(2), [Lin(3 + j) for j in range(keep)]
    taus = [float(tau) if tau_sigma_min <= sig[i] <= tau_sigma_max else 0.0 for i in range(n - 1)]

    def build():
        P, C = [], []
        for i in range(n - 1):
            kp, kc = min(predictor_order, i + 1), min(corrector_order, i + 2)
            z = Z if taus[i] > 0 else None
            P.append(sa_update(g, X, i, g.lam[i::-1][:kp], M[:kp], taus[i], z, order2).terms((0,)))
            C.append(sa_update(g, X, i, g.lam[i + 1::-1][:kc], [NEW] + M[:kc - 1], taus[i], z, order2).terms((0,))
                     if kc > 0 and i < n - 2 else None)
        return P, C
    P, C = cached_weights((sa_update, sa_weights, g.key, predictor_order, corrector_order, tuple(taus), order2), build)
    hist = [g.x0(dyn, x, 0)]                                  # newest first, at lambda_i, lambda_{i-1}, ...
    for i in range(n - 1):
        z = rng.increment(x, g.tf[i], g.tf[i + 1]) if taus[i] > 0 else None
        x_pred = combine(P[i], (x, z, None, *hist))
        m_new = g.x0(dyn, x_pred, i + 1)
        if C[i] is not None:
            x_pred = combine(C[i], (x, z, m_new, *hist))
        x = x_pred
        hist = ([m_new] + hist)[:keep]
    return hist[0]


def _sa_nfe(steps, predictor_order=3, corrector_order=4, tau=1.0, tau_sigma_min=SA_TAU_SIGMA[0],
            tau_sigma_max=SA_TAU_SIGMA[1], order2="sa_solver_code", **_):
    _check_sa(predictor_order, corrector_order, tau, tau_sigma_min, tau_sigma_max, order2)
    return steps


register_solver("sa_solver", nfe_of_steps=_sa_nfe, nfe_formula="steps", min_steps=2, stochastic=True, brownian=True,
                default_timesteps="logsnr",
                end_evals=lambda m, n, corrector_order=4, **_: int(corrector_order > 0 and m < n - 1))(sa_solver)
