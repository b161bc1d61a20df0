"""Golden versions of every registered sampler, written out from the papers for the golden-step tests.

Each function here re-derives its solver from the published algorithm, independently of bench.solvers: it
uses only the noise schedule (alpha, sigma, lambda and their inverses, f, g^2: the project's single source of
truth) and the exact eps-network, and never a helper of the solver package.  Where a paper leaves a choice
open, the choice the benchmark made is stated in one comment (read off solvers/*.py and conf/solver/*.yaml):

- every sampler ends with the x0-prediction made from an evaluation at the last positive time t[-1]
  (DESIGN 'final step'); multistep methods reuse the evaluation they already made there;
- multistep warm-up: the update from t_i uses order min(order, i + 1);
- DPM-Solver++ lower_order_final: the interval ending at t[-1] uses order <= 2 when len(t) < 15;
  UniPC lower_order_final: that interval uses order <= 2 always (diffusers' rule); no corrector follows it;
- stochastic samplers draw Brownian-increment noise with rng.increment(x, t_from, t_to) and any other noise
  (EDM churn, Langevin) with rng.randn_like(x); EDM draws only where gamma_i > 0.

All arithmetic is float64.  `Net` counts evaluations, so a golden also states the NFE its algorithm costs.
"""
from __future__ import annotations

import math
from fractions import Fraction as Fr

import numpy as np
import torch


# ------------------------------------------------------------------------------------------------ plumbing
class Net:
    """eps(x, t) of the exact model with a scalar time, counting evaluations; schedule scalars as floats."""

    def __init__(self, model):
        self.net, self.sch, self.calls = model.net, model.schedule, 0

    def eps(self, x, t):
        self.calls += 1
        return self.net(x, torch.full((x.shape[0],), float(t), dtype=torch.float64))

    def _f64(self, v):
        return torch.as_tensor(v, dtype=torch.float64)

    def alpha(self, t):
        return float(self.sch.alpha(self._f64(float(t))))

    def sigma(self, t):
        return float(self.sch.sigma(self._f64(float(t))))

    def lam(self, t):
        return float(self.sch.lambda_(self._f64(float(t))))

    def t_of_lam(self, lam):
        return float(self.sch.t_of_lambda(self._f64(float(lam))))

    def sig_hat(self, t):
        return self.sigma(t) / self.alpha(t)

    def t_of_sig_hat(self, s):
        return float(self.sch.t_of_sigma_hat(self._f64(float(s))))

    def f(self, t):
        return float(self.sch.f(self._f64(float(t))))

    def g2(self, t):
        return float(self.sch.g2(self._f64(float(t))))

    def x0_pred(self, x, t, eps=None):
        """Tweedie / the definition x_t = alpha x0 + sigma eps, solved for x0."""
        e = self.eps(x, t) if eps is None else eps
        return (x - self.sigma(t) * e) / self.alpha(t)


class StubRNG:
    """Pre-drawn standard normals handed out in call order, whatever method asks; the log keeps which method
    asked and for which interval, so the golden and the solver can be compared on both."""

    def __init__(self, seed: int = 0):
        self.seed, self.k, self.log = seed, 0, []

    def _next(self, x):
        g = torch.Generator().manual_seed(1_000_003 * self.seed + self.k)
        self.k += 1
        return torch.randn(tuple(x.shape), generator=g, dtype=torch.float64).to(x.dtype)

    def randn_like(self, x):
        self.log.append(("randn_like",))
        return self._next(x)

    def increment(self, x, t_from, t_to):
        self.log.append(("increment", round(float(t_from), 12), round(float(t_to), 12)))
        return self._next(x)


def _times(t):
    return [float(v) for v in t]


# ------------------------------------------------------------------------------------------ Runge-Kutta
# Butcher tableaus (c, A rows, b) from the textbooks (Butcher 2016; Hairer, Norsett & Wanner I, table 1.1-1.2).
TABLEAUS = {
    "euler": ([0], [[]], [1]),
    "midpoint": ([0, Fr(1, 2)], [[], [Fr(1, 2)]], [0, 1]),                       # Runge 1895
    "heun": ([0, 1], [[], [1]], [Fr(1, 2), Fr(1, 2)]),                           # trapezoidal / Heun's 2nd order
    "ralston": ([0, Fr(2, 3)], [[], [Fr(2, 3)]], [Fr(1, 4), Fr(3, 4)]),          # Ralston 1962
    "rk3": ([0, Fr(1, 2), 1], [[], [Fr(1, 2)], [-1, 2]], [Fr(1, 6), Fr(4, 6), Fr(1, 6)]),   # Kutta's 3rd order
    "rk4": ([0, Fr(1, 2), Fr(1, 2), 1], [[], [Fr(1, 2)], [0, Fr(1, 2)], [0, 0, 1]],
            [Fr(1, 6), Fr(2, 6), Fr(2, 6), Fr(1, 6)]),                           # classical Kutta 1901
}


class _Variable:
    """The probability-flow ODE written in one integration variable s; state y.
    sigma_hat: y = x/alpha, dy/ds = eps (Karras et al. 2022, eq. 4 with s(t) = alpha(t)).
    t:         y = x, dy/dt = f x + g^2/(2 sigma) eps (Song et al. 2021, eq. 13 with score = -eps/sigma).
    lambda:    y = x, dy/dlambda = (dy/dt)/(dlambda/dt) with dlambda/dt = -g^2/(2 sigma^2)."""

    def __init__(self, M: Net, name: str):
        self.M, self.name = M, name

    def s(self, t):
        return {"sigma_hat": self.M.sig_hat, "t": float, "lambda": self.M.lam}[self.name](t)

    def t(self, s):
        return {"sigma_hat": self.M.t_of_sig_hat, "t": float, "lambda": self.M.t_of_lam}[self.name](s)

    def to_y(self, x, t):
        return x / self.M.alpha(t) if self.name == "sigma_hat" else x

    def to_x(self, y, t):
        return y * self.M.alpha(t) if self.name == "sigma_hat" else y

    def rhs(self, s, y):
        M, t = self.M, self.t(s)
        x = self.to_x(y, t)
        e = M.eps(x, t)
        if self.name == "sigma_hat":
            return e
        dxdt = M.f(t) * x + M.g2(t) / (2 * M.sigma(t)) * e
        if self.name == "t":
            return dxdt
        return dxdt * (-2 * M.sigma(t) ** 2 / M.g2(t))


def _final_x0(M, V, y, t_last):
    return M.x0_pred(V.to_x(y, t_last), t_last)


def rk_golden(M: Net, x, t, tableau: str, variable: str = "sigma_hat"):
    """Explicit RK with the given Butcher tableau on the grid, in `variable`; then x0 at t[-1]."""
    c, A, b = TABLEAUS[tableau]
    V = _Variable(M, variable)
    ts = _times(t)
    y = V.to_y(x, ts[0])
    for n in range(len(ts) - 1):
        s0, s1 = V.s(ts[n]), V.s(ts[n + 1])
        h = s1 - s0
        ks = []
        for i in range(len(b)):
            yi = y.clone()
            for j, aij in enumerate(A[i]):
                if aij != 0:
                    yi = yi + h * float(aij) * ks[j]
            ks.append(V.rhs(s0 + float(c[i]) * h, yi))
        y = y + h * sum(float(bi) * k for bi, k in zip(b, ks) if bi != 0)
    return _final_x0(M, V, y, ts[-1])


def edm_heun_golden(M: Net, x, t):
    """Karras et al. 2022, Algorithm 1, in sigma_hat with t_N = 0 appended:
    d_i = (x_i - D(x_i; t_i))/t_i; x_{i+1} = x_i + (t_{i+1} - t_i) d_i; if t_{i+1} != 0, the trapezoidal correction."""
    sig = [M.sig_hat(v) for v in _times(t)] + [0.0]

    def D(x_hat, s):
        ts = M.t_of_sig_hat(s)
        return x_hat - s * M.eps(M.alpha(ts) * x_hat, ts)

    xh = x / M.alpha(float(t[0]))
    for i in range(len(sig) - 1):
        d = (xh - D(xh, sig[i])) / sig[i]
        xn = xh + (sig[i + 1] - sig[i]) * d
        if sig[i + 1] != 0:
            d2 = (xn - D(xn, sig[i + 1])) / sig[i + 1]
            xn = xh + (sig[i + 1] - sig[i]) * (0.5 * d + 0.5 * d2)
        xh = xn
    return xh


# -------------------------------------------------------------------------------------- linear multistep
IPNDM = {1: [1], 2: [Fr(3, 2), Fr(-1, 2)], 3: [Fr(23, 12), Fr(-16, 12), Fr(5, 12)],
         4: [Fr(55, 24), Fr(-59, 24), Fr(37, 24), Fr(-9, 24)]}   # fixed-step Adams-Bashforth, newest first


def ab_weights_variable(nodes, s_now, s_next):
    """Weights w with h sum_j w_j f(nodes_j) = int_{s_now}^{s_next} p(s) ds for every polynomial p of degree
    < len(nodes): the moment conditions sum_j w_j ((nodes_j - s_now)/h)^m = 1/(m+1), m = 0..k-1."""
    h = s_next - s_now
    z = (np.asarray(nodes, dtype=np.float64) - s_now) / h
    k = len(z)
    V = np.vstack([z ** m for m in range(k)])
    return np.linalg.solve(V, np.array([1.0 / (m + 1) for m in range(k)]))


def _rk_startup(V, s0, s1, y, f0, order):
    """A start-up step of order `order` - 1 from (s0, y) with f0 = y'(s0): Heun's trapezoidal predictor-corrector
    (order 2) or Kutta's third-order method (1/6, 4/6, 1/6 at c = 0, 1/2, 1; Hairer, Norsett & Wanner, table 1.1)."""
    h = s1 - s0
    if order == 3:
        f1 = V.rhs(s1, y + h * f0)
        return y + h / 2 * (f0 + f1)
    f1 = V.rhs(s0 + h / 2, y + h / 2 * f0)
    f2 = V.rhs(s1, y - h * f0 + 2 * h * f1)
    return y + h * (f0 + 4 * f1 + f2) / 6


def ab_golden(M: Net, x, t, order=2, ipndm=False, variable="sigma_hat", startup="lower"):
    """Adams-Bashforth-k (variable-step) or iPNDM (Zhang & Chen 2023: fixed-step AB weights), one evaluation per grid
    point; the first k-1 steps with the orders the history allows (startup 'lower') or, for k >= 3, Runge-Kutta
    steps of order k-1 (startup 'rk'); then x0 at t[-1]."""
    V = _Variable(M, variable)
    ts = _times(t)
    s = [V.s(v) for v in ts]
    y = V.to_y(x, ts[0])
    rk = startup == "rk" and order >= 3
    derivs = []                                   # newest first
    for n in range(len(ts) - 1):
        derivs = [V.rhs(s[n], y)] + derivs
        if rk and n < order - 1:
            y = _rk_startup(V, s[n], s[n + 1], y, derivs[0], order)
            continue
        k = min(order, n + 1)
        w = [float(c) for c in IPNDM[k]] if ipndm else ab_weights_variable(s[n::-1][:k], s[n], s[n + 1])
        y = y + (s[n + 1] - s[n]) * sum(float(wj) * dj for wj, dj in zip(w, derivs[:k]))
    return _final_x0(M, V, y, ts[-1])


# ----------------------------------------------------------------------------- DPM-Solver (Lu et al. 2022)
def _dpm_step(M: Net, x, t_prev, t_next, k):
    """One DPM-Solver-k step, noise prediction (Lu et al. 2022: eq. 3.7 (k=1); Alg. 1, r1 = 1/2 (k=2);
    Alg. 2, r1 = 1/3, r2 = 2/3 (k=3))."""
    lp, ln = M.lam(t_prev), M.lam(t_next)
    h = ln - lp
    a_p, a_n, s_n = M.alpha(t_prev), M.alpha(t_next), M.sigma(t_next)
    e0 = M.eps(x, t_prev)
    base = (a_n / a_p) * x - s_n * (math.exp(h) - 1) * e0
    if k == 1:
        return base
    if k == 2:
        r1 = 0.5
        s1 = M.t_of_lam(lp + r1 * h)
        u1 = (M.alpha(s1) / a_p) * x - M.sigma(s1) * (math.exp(r1 * h) - 1) * e0
        return base - s_n / (2 * r1) * (math.exp(h) - 1) * (M.eps(u1, s1) - e0)
    r1, r2 = 1 / 3, 2 / 3
    s1, s2 = M.t_of_lam(lp + r1 * h), M.t_of_lam(lp + r2 * h)
    u1 = (M.alpha(s1) / a_p) * x - M.sigma(s1) * (math.exp(r1 * h) - 1) * e0
    D1 = M.eps(u1, s1) - e0
    u2 = ((M.alpha(s2) / a_p) * x - M.sigma(s2) * (math.exp(r2 * h) - 1) * e0
          - M.sigma(s2) * r2 / r1 * ((math.exp(r2 * h) - 1) / (r2 * h) - 1) * D1)
    D2 = M.eps(u2, s2) - e0
    return base - s_n / r2 * ((math.exp(h) - 1) / h - 1) * D2


def dpm_fast_allocation(N, order=3):
    """The DPM-Solver reference code's get_orders_and_timesteps_for_singlestep_solver (Lu et al. 2022, sec. 3.4), as
    its docstring states it: order 3, K = N // 3 + 1 intervals: N % 3 == 0 -> K - 2 third-order steps, one second-
    and one first-order; N % 3 == 1 -> K - 1 third-order and one first-order; N % 3 == 2 -> K - 1 third-order and one
    second-order.  Order 2: N even -> N/2 second-order steps, N odd -> N // 2 and one first-order.  Order 1: N."""
    if order == 3:
        K = N // 3 + 1
        return {0: [3] * (K - 2) + [2, 1], 1: [3] * (K - 1) + [1], 2: [3] * (K - 1) + [2]}[N % 3]
    if order == 2:
        return [2] * (N // 2) if N % 2 == 0 else [2] * (N // 2) + [1]
    return [1] * N


def dpm_solver_golden(M: Net, x, t, order=3, fast=False, orders=None, fast_nfe=None, final="x0"):
    """Singlestep DPM-Solver-k on every interval; DPM-Solver-fast (sec. 3.4): for K intervals the paper's
    N = 3K - 1 case, K - 1 third-order steps then one second-order step; orders: one order per interval as given;
    fast_nfe: the reference code's allocation of that NFE.  Then x0 at t[-1] (final 'x0'), or x at t[-1] as it
    stands (final 't_end': the paper stops at t_end without denoising; the reference code's denoise_to_zero=False)."""
    ts = _times(t)
    K = len(ts) - 1
    if orders is not None:
        ks = list(orders)
    elif fast_nfe is not None:
        ks = dpm_fast_allocation(fast_nfe, order)
    else:
        ks = ([3] * (K - 1) + [2]) if fast else [order] * K
    assert len(ks) == K, (ks, K)
    for i, k in enumerate(ks):
        x = _dpm_step(M, x, ts[i], ts[i + 1], k)
    return M.x0_pred(x, ts[-1]) if final == "x0" else x


# ------------------------------------------------------------------------ DPM-Solver++ (Lu et al. 2022b)
def _integral_weights(h, kmax):
    """I_k = int_0^h e^{u - h} u^k / k! du, k = 0..kmax (Gauss-Legendre, exact to rounding for these smooth
    integrands): x_t = (sigma_t/sigma_s) x_s + alpha_t sum_k I_k x0^(k)(lambda_s) (Lu et al. 2022b, eq. 9)."""
    xg, wg = np.polynomial.legendre.leggauss(40)
    u = (xg + 1) * h / 2
    return [float((wg * h / 2 * np.exp(u - h) * u ** k).sum() / math.factorial(k)) for k in range(kmax + 1)]


def dpm_pp_multistep_golden(M: Net, x, t, order=2, lower_order_final=True, d2="taylor"):
    """DPM-Solver++(kM), data prediction, multistep in lambda.  k = 1: eq. (5); k = 2: Alg. 2 of Lu et al. 2022b;
    k = 3 (the paper gives no formula; the reference code's form): x0(lambda) replaced by its Taylor polynomial
    at lambda_i of degree 2, derivatives from the quadratic through the last three predictions, each Taylor
    term integrated exactly (I_0, I_1, I_2).  d2='dpm_solver_code' halves the second-derivative term, as the
    reference code does.  Then x0 at t[-1] (the evaluation there)."""
    ts = _times(t)
    n = len(ts)
    lams = [M.lam(v) for v in ts]
    hist = []                                     # (lambda, x0) newest first
    for i in range(n - 1):
        hist = [(lams[i], M.x0_pred(x, ts[i]))] + hist[:2]
        k = min(order, i + 1)
        if lower_order_final and n < 15 and i == n - 2:
            k = min(k, 2)
        h = lams[i + 1] - lams[i]
        I = _integral_weights(h, 2)
        a_t = M.alpha(ts[i + 1])
        ratio = M.sigma(ts[i + 1]) / M.sigma(ts[i])
        if k == 1:                                # eq. (5): first order
            x = ratio * x + a_t * I[0] * hist[0][1]
        elif k == 2:                              # Alg. 2: D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1}/h_i
            r = (lams[i] - lams[i - 1]) / h
            D = (1 + 1 / (2 * r)) * hist[0][1] - 1 / (2 * r) * hist[1][1]
            x = ratio * x - a_t * (math.exp(-h) - 1) * D
        else:                                     # Taylor terms k = 0, 1, 2 with Newton divided differences in lambda
            (l0, m0), (l1, m1), (l2, m2) = hist
            f01, f12 = (m0 - m1) / (l0 - l1), (m1 - m2) / (l1 - l2)
            f012 = (f01 - f12) / (l0 - l2)
            d1 = f01 + f012 * (l0 - l1)           # p'(l0) of the quadratic through the three points
            d2v = 2 * f012                        # p''
            x = (ratio * x + a_t * I[0] * m0 + a_t * I[1] * d1
                 + a_t * I[2] * d2v * (1.0 if d2 == "taylor" else 0.5))
    return M.x0_pred(x, ts[-1])


def dpm_pp_singlestep_golden(M: Net, x, t, order=2):
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = 1/2): u at lambda_s + r h from the first-order update,
    D = (1 - 1/(2r)) x0(x_s) + 1/(2r) x0(u); order 1 is the first-order update.  Then x0 at t[-1]."""
    ts = _times(t)
    r = 0.5
    for i in range(len(ts) - 1):
        ls, lt = M.lam(ts[i]), M.lam(ts[i + 1])
        h = lt - ls
        m_s = M.x0_pred(x, ts[i])
        D = m_s
        if order == 2:
            s_mid = M.t_of_lam(ls + r * h)
            u = (M.sigma(s_mid) / M.sigma(ts[i])) * x - M.alpha(s_mid) * (math.exp(-r * h) - 1) * m_s
            D = (1 - 1 / (2 * r)) * m_s + 1 / (2 * r) * M.x0_pred(u, s_mid)
        x = (M.sigma(ts[i + 1]) / M.sigma(ts[i])) * x - M.alpha(ts[i + 1]) * (math.exp(-h) - 1) * D
    return M.x0_pred(x, ts[-1])


# ------------------------------------------------------------------------------ UniPC (Zhao et al. 2023)
def _unipc_weights(rs, h, B, n_cond):
    """a with sum_m a_m r_m^(k-1) = -k! I_k / (B h^k), k = 1..n_cond.  With D_m / r_m = sum_k x0^(k) h^k r_m^(k-1)/k!
    the update term -alpha_t B sum_m a_m D_m / r_m then equals alpha_t sum_{k=1..n_cond} I_k x0^(k), the exact
    solution's terms (Zhao et al. 2023, eq. 8-9: R_p a_p = g_p / B(h))."""
    I = _integral_weights(h, n_cond)
    R = np.array([[r ** (k - 1) for r in rs] for k in range(1, n_cond + 1)], dtype=np.float64)
    rhs = np.array([-math.factorial(k) * I[k] / (B * h ** k) for k in range(1, n_cond + 1)])
    return np.linalg.solve(R, rhs)


def unipc_golden(M: Net, x, t, order=2, variant="bh2", lower_order_final=True):
    """UniPC-p, data prediction, B(h) = h (bh1) or e^h - 1 (bh2), both at -h for data prediction.
    UniP-k uses the k-1 previous predictions (k = 2: a = 1/2, the paper's choice); UniC-k adds the new
    prediction at t_{i+1} with r = 1 (k = 1: a = 1/2).  The corrected state replaces the predicted one; the
    evaluation at t_{i+1} is reused as the next history point; no corrector after the last interval."""
    ts = _times(t)
    n = len(ts)
    lams = [M.lam(v) for v in ts]
    hist = [M.x0_pred(x, ts[0])]
    m_new = hist[0]
    for i in range(n - 1):
        k = min(order, i + 1)
        if lower_order_final and i == n - 2:
            k = min(k, 2)
        h = lams[i + 1] - lams[i]
        B = -h if variant == "bh1" else math.expm1(-h)
        a_t, m0 = M.alpha(ts[i + 1]), hist[0]
        rs = [(lams[i - m] - lams[i]) / h for m in range(1, k)]
        Ds = [(hist[m] - m0) / r for m, r in zip(range(1, k), rs)]
        base = (M.sigma(ts[i + 1]) / M.sigma(ts[i])) * x + a_t * (1 - math.exp(-h)) * m0
        if k == 1:
            a_p = []
        elif k == 2:
            a_p = [0.5]
        else:
            a_p = list(_unipc_weights(rs, h, B, k - 1))
        x_pred = base - a_t * B * sum((float(a) * d for a, d in zip(a_p, Ds)), torch.zeros_like(x))
        m_new = M.x0_pred(x_pred, ts[i + 1])
        if i < n - 2:
            a_c = [0.5] if k == 1 else list(_unipc_weights(rs + [1.0], h, B, k))
            corr = sum((float(a) * d for a, d in zip(a_c[:-1], Ds)), torch.zeros_like(x))
            corr = corr + float(a_c[-1]) * (m_new - m0)
            x_pred = base - a_t * B * corr
        x = x_pred
        hist = [m_new] + hist[:order - 1]
    return m_new


# ------------------------------------------------------------------------------------------ stochastic
def euler_maruyama_golden(M: Net, x, t, rng):
    """Song et al. 2021, eq. 6: dx = [f x - g^2 score] dt + g dW-bar, Euler-Maruyama with dt < 0,
    score = -eps/sigma; the Brownian increment is sqrt|dt| z.  Then x0 at t[-1]."""
    ts = _times(t)
    for n in range(len(ts) - 1):
        t0, t1 = ts[n], ts[n + 1]
        dt = t1 - t0
        score = -M.eps(x, t0) / M.sigma(t0)
        z = rng.increment(x, t[n], t[n + 1])
        x = x + (M.f(t0) * x - M.g2(t0) * score) * dt + math.sqrt(M.g2(t0)) * math.sqrt(-dt) * z
    return M.x0_pred(x, ts[-1])


def ddpm_beta_golden(M: Net, x, t, rng):
    """Ho et al. 2020, Alg. 2 with sigma_t^2 = beta_t (sec. 3.2), on the grid's steps (VP): for the step t_n -> t_{n+1}
    abar_t = alpha(t_n)^2, abar_{t-1} = alpha(t_{n+1})^2, alpha_t = abar_t / abar_{t-1}, beta_t = 1 - alpha_t;
    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps(x_t, t)) + sqrt(beta_t) z.  Then x0 at t[-1]."""
    ts = _times(t)
    for n in range(len(ts) - 1):
        abar_t, abar_prev = M.alpha(ts[n]) ** 2, M.alpha(ts[n + 1]) ** 2
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t
        e = M.eps(x, ts[n])
        z = rng.increment(x, t[n], t[n + 1])
        x = (x - beta_t / math.sqrt(1 - abar_t) * e) / math.sqrt(alpha_t) + math.sqrt(beta_t) * z
    return M.x0_pred(x, ts[-1])


def ancestral_golden(M: Net, x, t, rng, variant="ddpm", eta=1.0, variance="posterior"):
    """'ddpm': DDIM, Song et al. 2021a, eq. 12 with sigma_t(eta) of eq. 16, in DDPM's notation
    abar = alpha^2, sqrt(1 - abar) = sigma (VP): eta = 1 is Ho et al. 2020, Alg. 2.
    'euler': k-diffusion's Euler-ancestral in sigma_hat: sigma_up = min(s_to, eta s_to sqrt(1 - s_to^2/s_from^2)),
    sigma_down = sqrt(s_to^2 - sigma_up^2), Euler step to sigma_down, then + sigma_up z.  Then x0 at t[-1].
    variance 'beta' (variant 'ddpm', eta = 1): DDPM's Alg. 2 with sigma_t^2 = beta_t (ddpm_beta_golden)."""
    if variance == "beta":
        assert variant == "ddpm" and eta == 1
        return ddpm_beta_golden(M, x, t, rng)
    ts = _times(t)
    for n in range(len(ts) - 1):
        tf, tt = ts[n], ts[n + 1]
        e = M.eps(x, tf)
        z = rng.increment(x, t[n], t[n + 1])
        if variant == "ddpm":
            ab_f, ab_t = M.alpha(tf) ** 2, M.alpha(tt) ** 2
            sd_f, sd_t = M.sigma(tf), M.sigma(tt)             # sqrt(1 - abar)
            s_eta = eta * (sd_t / sd_f) * math.sqrt(1 - ab_f / ab_t)
            x0 = (x - sd_f * e) / math.sqrt(ab_f)
            x = math.sqrt(ab_t) * x0 + math.sqrt(sd_t ** 2 - s_eta ** 2) * e + s_eta * z
        else:
            s_f, s_t = M.sig_hat(tf), M.sig_hat(tt)
            up = min(s_t, eta * math.sqrt(s_t ** 2 * (s_f ** 2 - s_t ** 2) / s_f ** 2))
            down = math.sqrt(s_t ** 2 - up ** 2)
            xh = x / M.alpha(tf)
            d = e                                            # (x_hat - D(x_hat; s_f)) / s_f
            xh = xh + (down - s_f) * d + up * z
            x = xh * M.alpha(tt)
    return M.x0_pred(x, ts[-1])


def edm_stochastic_golden(M: Net, x, t, rng, S_churn=30.0, S_min=0.01, S_max=1.0, S_noise=1.007):
    """Karras et al. 2022, Algorithm 2 in sigma_hat (x_hat = x/alpha), N = len(t) noise levels and t_N = 0:
    gamma_i = min(S_churn/N, sqrt(2) - 1) on [S_tmin, S_tmax]; t_hat = t_i (1 + gamma_i);
    x_hat += sqrt(t_hat^2 - t_i^2) S_noise z; Euler step from t_hat, Heun correction unless t_{i+1} = 0."""
    ts = _times(t)
    N = len(ts)
    sig = [M.sig_hat(v) for v in ts] + [0.0]

    def D(xh, s):
        tt = M.t_of_sig_hat(s)
        return xh - s * M.eps(M.alpha(tt) * xh, tt)

    xi = x / M.alpha(ts[0])
    for i in range(N):
        gamma = min(S_churn / N, 2 ** 0.5 - 1) if S_min <= sig[i] <= S_max else 0.0
        s_hat = sig[i] + gamma * sig[i]
        if gamma > 0:
            xi = xi + math.sqrt(s_hat ** 2 - sig[i] ** 2) * S_noise * rng.randn_like(xi)
        d = (xi - D(xi, s_hat)) / s_hat
        x_next = xi + (sig[i + 1] - s_hat) * d
        if sig[i + 1] != 0:
            d2 = (x_next - D(x_next, sig[i + 1])) / sig[i + 1]
            x_next = xi + (sig[i + 1] - s_hat) * (0.5 * d + 0.5 * d2)
        xi = x_next
    return xi


def pc_golden(M: Net, x, t, rng, predictor="reverse_diffusion", snr=0.16, n_corrector=1, step_size="norms"):
    """Song et al. 2021, Alg. 2/3 with the VP predictor and corrector of Alg. 5 (vp schedule):
    reverse diffusion x <- (2 - sqrt(1 - beta_i)) x + beta_i s(x, t_i) + sqrt(beta_i) z with the discrete
    1 - beta_i = (alpha(t_i)/alpha(t_{i+1}))^2 of the grid; or an Euler-Maruyama predictor (eq. 6).
    Langevin corrector at t_{i+1}: eps_L = 2 (snr ||z|| / ||s||)^2 per sample ('norms', Alg. 4/5 with the
    alpha_i factor taken as 1) or 2 snr^2 sigma(t)^2 ('sigma2'); x <- x + eps_L s + sqrt(2 eps_L) z.
    Then x0 at t[-1]."""
    ts = _times(t)
    for n in range(len(ts) - 1):
        t0, t1 = ts[n], ts[n + 1]
        if predictor == "reverse_diffusion":
            beta = 1 - (M.alpha(t0) / M.alpha(t1)) ** 2
            s = -M.eps(x, t0) / M.sigma(t0)
            z = rng.increment(x, t[n], t[n + 1])
            x = (2 - math.sqrt(1 - beta)) * x + beta * s + math.sqrt(beta) * z
        else:
            dt = t1 - t0
            s = -M.eps(x, t0) / M.sigma(t0)
            z = rng.increment(x, t[n], t[n + 1])
            x = x + (M.f(t0) * x - M.g2(t0) * s) * dt + math.sqrt(M.g2(t0) * -dt) * z
        for _ in range(n_corrector):
            z = rng.randn_like(x)
            s = -M.eps(x, t1) / M.sigma(t1)
            if step_size == "norms":
                e = 2 * (snr * z.norm(dim=1) / s.norm(dim=1)) ** 2
                e = e[:, None]
            else:
                e = 2 * snr ** 2 * M.sigma(t1) ** 2
            x = x + e * s + (2 * e) ** 0.5 * z
    return M.x0_pred(x, ts[-1])


def annealed_langevin_golden(M: Net, x, t, rng, steps_per_level=100, eps=2e-5, denoise=True):
    """Song & Ermon 2019, Alg. 1 with sigma_i = sigma_hat(t_i) = sigma/alpha, i = 1..L, in x_hat = x/alpha, where
    p_sigma = p_data * N(0, sigma^2 I) has score s(x_hat) = -eps(alpha x_hat, t_i)/sigma_i:
    alpha_i = eps sigma_i^2/sigma_L^2; T times: z ~ N(0, I), x_hat <- x_hat + alpha_i/2 s + sqrt(alpha_i) z.
    denoise: the T-th evaluation at sigma_L gives x0 = x_hat - sigma_L eps (Tweedie) instead of the last move."""
    ts = _times(t)
    L = len(ts)
    sig = [M.sig_hat(v) for v in ts]
    xh = x / M.alpha(ts[0])
    for i in range(L):
        a_i = eps * sig[i] ** 2 / sig[-1] ** 2
        moves = steps_per_level - 1 if (denoise and i == L - 1) else steps_per_level
        for _ in range(moves):
            z = rng.randn_like(xh)
            s = -M.eps(M.alpha(ts[i]) * xh, ts[i]) / sig[i]
            xh = xh + a_i / 2 * s + math.sqrt(a_i) * z
    if denoise:
        return M.x0_pred(M.alpha(ts[-1]) * xh, ts[-1])
    return xh


# ------------------------------------------------------------------------------------------ dispatcher
def golden(name: str, M: Net, x, t, rng, **knobs):
    """The golden of registered solver `name` with its knobs (defaults as in conf/solver/NAME.yaml)."""
    if name in TABLEAUS:
        variable = knobs.get("variable", "sigma_hat")
        if name == "heun" and variable == "sigma_hat":
            return edm_heun_golden(M, x, t)
        return rk_golden(M, x, t, name, variable)
    if name == "ab":
        return ab_golden(M, x, t, **knobs)
    if name == "dpm_solver":
        return dpm_solver_golden(M, x, t, **knobs)
    if name == "dpm_solver_pp":
        k = dict(knobs)
        if k.pop("method", "multistep") == "singlestep":
            return dpm_pp_singlestep_golden(M, x, t, order=k.get("order", 2))
        return dpm_pp_multistep_golden(M, x, t, **k)
    if name == "unipc":
        return unipc_golden(M, x, t, **knobs)
    if name == "euler_maruyama":
        return euler_maruyama_golden(M, x, t, rng)
    if name == "ancestral":
        return ancestral_golden(M, x, t, rng, **knobs)
    if name == "edm_stochastic":
        return edm_stochastic_golden(M, x, t, rng, **knobs)
    if name == "pc":
        return pc_golden(M, x, t, rng, **knobs)
    if name == "annealed_langevin":
        return annealed_langevin_golden(M, x, t, rng, **knobs)
    if name == "dpm_solver_pp_sde":
        return dpm_pp_sde_golden(M, x, t, rng, **knobs)
    if name == "sa_solver":
        return sa_solver_golden(M, x, t, rng, **knobs)
    if name == "restart":
        return restart_golden(M, x, t, rng, **knobs)
    if name == "deis":
        return deis_golden(M, x, t, **knobs)
    if name == "ipndm_v":
        return ipndm_v_golden(M, x, t, **knobs)
    raise KeyError(f"no golden algorithm for solver '{name}'")


# ----------------------------------------------------------------- SDE multistep: DPM-Solver++ SDE, SA-Solver
def _kernel_integral(h, c, f):
    """int_0^h c e^{-c (h - u)} f(u) du by 40-point Gauss-Legendre (exact to rounding for these smooth integrands):
    the weight of x0 in the exact solution of dx = [f x - c/2 g^2 score] dt + sqrt(c - 1) g dW over one step in
    lambda (data prediction; Xue et al. 2023's variance-controlled SDE with c = 1 + tau^2, eta = tau^2)."""
    xg, wg = np.polynomial.legendre.leggauss(40)
    u = (xg + 1) * h / 2
    return float((wg * h / 2 * c * np.exp(-c * (h - u)) * f(u)).sum())


def dpm_pp_sde_golden(M: Net, x, t, rng, order=2, eta=1.0, solver_type="midpoint", d2="taylor",
                      lower_order_final=True):
    """DPM-Solver++(2M/3M) SDE in k-diffusion's variables x_hat = x/alpha, sigma_hat = e^{-lambda} (sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde; Lu et al. 2022b's SDE-DPM-Solver++ at eta = 1):
    x_hat' = (s'/s) e^{-eta h} x_hat + int_0^h (1+eta) e^{-(1+eta)(h-u)} p(u) du + s' sqrt(1 - e^{-2 eta h}) z,
    p the x0 expansion: order 1 constant; order 2 'heun' the line through the last two predictions integrated exactly,
    'midpoint' (1 - e^{-(1+eta)h})/2 times h * slope; order 3 the Taylor polynomial of the quadratic through three
    predictions (its second-derivative term halved for d2='dpm_solver_code').  Warm-up min(order, i+1); lowered last
    interval as dpm_pp_multistep_golden.  z from rng.increment only where eta > 0.  Then x0 at t[-1]."""
    ts = _times(t)
    n = len(ts)
    lams = [M.lam(v) for v in ts]
    c = 1.0 + eta
    xh = x / M.alpha(ts[0])
    hist = []
    for i in range(n - 1):
        hist = [(lams[i], M.x0_pred(M.alpha(ts[i]) * xh, ts[i]))] + hist[:2]
        z = rng.increment(x, t[i], t[i + 1]) if eta > 0 else None
        k = min(order, i + 1)
        if lower_order_final and n < 15 and i == n - 2:
            k = min(k, 2)
        h = lams[i + 1] - lams[i]
        s0, s1 = M.sig_hat(ts[i]), M.sig_hat(ts[i + 1])
        m0 = hist[0][1]
        new = (s1 / s0) * math.exp(-eta * h) * xh + _kernel_integral(h, c, lambda u: np.ones_like(u)) * m0
        if k == 2:
            slope = (m0 - hist[1][1]) / (hist[0][0] - hist[1][0])
            if solver_type == "heun":
                new = new + _kernel_integral(h, c, lambda u: u) * slope
            else:
                new = new + 0.5 * (1 - math.exp(-c * h)) * h * slope
        elif k == 3:
            (l0, a), (l1, b), (l2, e) = hist
            f01, f12 = (a - b) / (l0 - l1), (b - e) / (l1 - l2)
            f012 = (f01 - f12) / (l0 - l2)
            d1 = f01 + f012 * (l0 - l1)
            d2v = 2 * f012 * (1.0 if d2 == "taylor" else 0.5)
            new = new + _kernel_integral(h, c, lambda u: u) * d1 + _kernel_integral(h, c, lambda u: u * u / 2) * d2v
        if z is not None:
            new = new + s1 * math.sqrt(1 - math.exp(-2 * eta * h)) * z
        xh = new
        x = xh * M.alpha(ts[i + 1])
    return M.x0_pred(x, ts[-1])


def _lagrange(nodes, j):
    """The j-th Lagrange basis polynomial through `nodes`, as a function of u (numpy)."""
    def f(u):
        out = np.ones_like(u)
        for m, lm in enumerate(nodes):
            if m != j:
                out = out * (u - lm) / (nodes[j] - lm)
        return out
    return f


def _sa_step(M: Net, x, ts, lams, i, nodes_lam, x0s, tau, z, order2):
    """One SA-Predictor / SA-Corrector step t_i -> t_{i+1} (Xue et al. 2023), data prediction: x0 replaced by its
    Lagrange interpolant through (nodes_lam, x0s), integrated exactly against the kernel of the SDE with tau.
    order2='sa_solver_code' with two nodes: the SA-Solver code's extra term alpha_t [c h^2/2 - int c e^{..} u du] times
    the slope between the two nodes (diffusers' SASolverScheduler, 'similar to UniPC')."""
    h = lams[i + 1] - lams[i]
    c = 1.0 + tau * tau
    a_t = M.alpha(ts[i + 1])
    nodes = [lj - lams[i] for lj in nodes_lam]
    new = (M.sigma(ts[i + 1]) / M.sigma(ts[i])) * math.exp(-tau * tau * h) * x
    for j, mj in enumerate(x0s):
        new = new + a_t * _kernel_integral(h, c, _lagrange(nodes, j)) * mj
    if len(x0s) == 2 and order2 == "sa_solver_code":
        slope = (x0s[0] - x0s[1]) / (nodes_lam[0] - nodes_lam[1])
        new = new + a_t * (c * h * h / 2 - _kernel_integral(h, c, lambda u: u)) * slope
    if z is not None:
        new = new + M.sigma(ts[i + 1]) * math.sqrt(1 - math.exp(-2 * tau * tau * h)) * z
    return new


def sa_solver_golden(M: Net, x, t, rng, predictor_order=3, corrector_order=4, tau=1.0, tau_sigma_min=0.72,
                     tau_sigma_max=25.1, order2="sa_solver_code"):
    """SA-Solver (Xue et al. 2023): tau_i = tau where sigma_hat(t_i) is in [tau_sigma_min, tau_sigma_max], else 0 (the
    paper's piecewise-constant tau); z_i from rng.increment where tau_i > 0.  Predictor of order min(p, i+1) on nodes
    t_i, t_{i-1}, ...; evaluation at the predicted point; corrector of order min(c, i+2) on t_{i+1}, t_i, ... from x_i
    with the same tau_i and z_i, none after the last interval; the corrected state replaces the predicted one and the
    evaluation at the predicted point is the history.  Then x0 at t[-1] (that last evaluation)."""
    ts = _times(t)
    n = len(ts)
    lams = [M.lam(v) for v in ts]
    ms = [M.x0_pred(x, ts[0])]                      # oldest first
    for i in range(n - 1):
        tau_i = tau if tau_sigma_min <= M.sig_hat(ts[i]) <= tau_sigma_max else 0.0
        z = rng.increment(x, t[i], t[i + 1]) if tau_i > 0 else None
        kp = min(predictor_order, i + 1)
        x_pred = _sa_step(M, x, ts, lams, i, lams[i + 1 - kp:i + 1][::-1], ms[::-1][:kp], tau_i, z, order2)
        m_new = M.x0_pred(x_pred, ts[i + 1])
        kc = min(corrector_order, i + 2)
        if kc > 0 and i < n - 2:
            x_pred = _sa_step(M, x, ts, lams, i, lams[i + 2 - kc:i + 2][::-1], (ms + [m_new])[::-1][:kc], tau_i, z,
                              order2)
        x = x_pred
        ms.append(m_new)
    return ms[-1]


# ------------------------------------------------------------------------------------------ Restart sampling
def restart_golden(M: Net, x, t, rng, restart=((0.06, 0.30, 2, 2),), S_noise=1.0):
    """Xu et al. 2023, Alg. 1 on EDM's Heun (Karras et al. 2022, Alg. 1) in sigma_hat with t_N = 0 appended, as the
    paper's generate_restart.py: t_min of each interval moved to the nearest main-grid sigma; after the main step that
    reaches it, K times: x_hat += S_noise sqrt(t_max^2 - t_min^2) z (z from rng.randn_like), then N Heun steps on the
    rho = 7 grid from t_max down to t_min.  The last main step is Euler (to sigma = 0)."""
    sig = [M.sig_hat(v) for v in _times(t)]
    plan = {}
    for s_min, s_max, K, N in restart:
        j = int(np.argmin([abs(s - s_min) for s in sig]))
        plan.setdefault(j, []).append((s_max, K, N))
    sig = sig + [0.0]

    def D(x_hat, s):
        ts = M.t_of_sig_hat(s)
        return x_hat - s * M.eps(M.alpha(ts) * x_hat, ts)

    def heun(xh, s_cur, s_next):
        d = (xh - D(xh, s_cur)) / s_cur
        xn = xh + (s_next - s_cur) * d
        if s_next != 0:
            d2 = (xn - D(xn, s_next)) / s_next
            xn = xh + (s_next - s_cur) * (0.5 * d + 0.5 * d2)
        return xn

    xh = x / M.alpha(float(t[0]))
    for i in range(len(sig) - 1):
        xh = heun(xh, sig[i], sig[i + 1])
        for s_max, K, N in plan.get(i + 1, []):
            t_min = sig[i + 1]
            grid = [(s_max ** (1 / 7) + k / N * (t_min ** (1 / 7) - s_max ** (1 / 7))) ** 7 for k in range(N + 1)]
            grid[0], grid[-1] = s_max, t_min
            for _ in range(K):
                xh = xh + rng.randn_like(xh) * math.sqrt(s_max ** 2 - t_min ** 2) * S_noise
                for k in range(N):
                    xh = heun(xh, grid[k], grid[k + 1])
    return xh


# ------------------------------------------------------------------- DEIS (Zhang & Chen 2023), ipndm_v (diff-sampler)
def _deis_C(M: Net, t_from, t_to, v_of_t, nodes):
    """[C_i0, C_i1, ...]: C_ij = int_{t_from}^{t_to} Psi(t_to, tau) g^2(tau)/(2 sigma(tau)) l_j(v(tau)) dtau (Zhang & Chen
    2023, eq. 17 with L = sigma, Psi(t, s) = alpha(t)/alpha(s)), l_j the Lagrange basis on `nodes` (values of v).
    Composite Gauss-Legendre in t on pieces growing geometrically (ratio 2) away from the smaller end, where
    g^2/sigma ~ tau^-1/2."""
    lo, hi = min(t_from, t_to), max(t_from, t_to)
    edges = [lo]
    while edges[-1] * 2 < hi:
        edges.append(edges[-1] * 2)
    edges.append(hi)
    xg, wg = np.polynomial.legendre.leggauss(16)
    C = [0.0] * len(nodes)
    for a, b in zip(edges[:-1], edges[1:]):
        for xi, wi in zip(xg, wg):
            tau = (a + b) / 2 + (b - a) / 2 * float(xi)
            f = (b - a) / 2 * float(wi) * M.alpha(t_to) / M.alpha(tau) * M.g2(tau) / (2 * M.sigma(tau))
            v = v_of_t(tau)
            for j in range(len(nodes)):
                lj = 1.0
                for m, vm in enumerate(nodes):
                    if m != j:
                        lj *= (v - vm) / (nodes[j] - vm)
                C[j] += f * lj
    return C if t_to > t_from else [-c for c in C]


def deis_golden(M: Net, x, t, order=2, method="tab", startup="lower"):
    """DEIS (Zhang & Chen 2023), eq. 16-17: x_{i+1} = Psi(t_{i+1}, t_i) x_i + sum_j C_ij eps_{i-j}, eps extrapolated by the
    degree-r polynomial through the last r + 1 evaluations in v = t (tAB), rho = sigma_hat (rhoAB) or log rho = -lambda
    (logrho, diffusers' variant); warm-up with min(r, i) + 1 points, or (startup 'rk', r >= 2) the first r steps as
    Runge-Kutta steps of order r in x_hat and sigma_hat (rhoRK: heun, Kutta's third order); then x0 at t[-1]."""
    v_of_t = {"tab": float, "rhoab": M.sig_hat, "logrho": lambda u: -M.lam(u)}[method]
    ts = _times(t)
    V = _Variable(M, "sigma_hat")
    n_rk = min(order, len(ts) - 1) if startup == "rk" and order >= 2 else 0
    eps = []                                      # newest first
    for i in range(len(ts) - 1):
        eps = [M.eps(x, ts[i])] + eps
        if i < n_rk:
            y = _rk_startup(V, M.sig_hat(ts[i]), M.sig_hat(ts[i + 1]), x / M.alpha(ts[i]), eps[0], order + 1)
            x = y * M.alpha(ts[i + 1])
            continue
        nodes = [v_of_t(ts[i - j]) for j in range(min(order, i) + 1)]
        C = _deis_C(M, ts[i], ts[i + 1], v_of_t, nodes)
        x = M.alpha(ts[i + 1]) / M.alpha(ts[i]) * x + sum(c * e for c, e in zip(C, eps))
    return M.x0_pred(x, ts[-1])


def ipndm_v_golden(M: Net, x, t, order=4):
    """zju-pi/diff-sampler's ipndm_v_sampler in sigma_hat, its coefficients written out term by term (h_n = next step,
    h_n_k = the k-th previous one); orders min(order, i + 1); then x0 at t[-1]."""
    ts = _times(t)
    sig = [M.sig_hat(v) for v in ts]
    xh = x / M.alpha(ts[0])
    d = []                                        # eps, newest first
    for i in range(len(ts) - 1):
        d = [M.eps(M.alpha(ts[i]) * xh, ts[i])] + d
        k = min(order, i + 1)
        hn = sig[i + 1] - sig[i]
        if k == 1:
            c = [1.0]
        else:
            hn1 = sig[i] - sig[i - 1]
            c = [(2 + hn / hn1) / 2, -(hn / hn1) / 2]
        if k >= 3:
            hn2 = sig[i - 1] - sig[i - 2]
            t1 = (1 - hn / (3 * (hn + hn1)) * (hn * (hn + hn1)) / (hn1 * (hn1 + hn2))) / 2
            c = [c[0] + t1, c[1] - (1 + hn1 / hn2) * t1, t1 * hn1 / hn2]
        if k == 4:
            hn3 = sig[i - 2] - sig[i - 3]
            t2 = ((1 - hn / (3 * (hn + hn1))) / 2 + (1 - hn / (2 * (hn + hn1))) * hn / (6 * (hn + hn1 + hn2))) \
                * (hn * (hn + hn1) * (hn + hn1 + hn2)) / (hn1 * (hn1 + hn2) * (hn1 + hn2 + hn3))
            q = hn1 * (hn1 + hn2) / (hn2 * (hn2 + hn3))
            c = [c[0] + t2, c[1] - (1 + hn1 / hn2 + q) * t2, c[2] + (hn1 / hn2 + q * (1 + hn2 / hn3)) * t2,
                 -t2 * q * hn1 / hn2]
        xh = xh + hn * sum(cj * dj for cj, dj in zip(c, d))
    return M.x0_pred(M.alpha(ts[-1]) * xh, ts[-1])
