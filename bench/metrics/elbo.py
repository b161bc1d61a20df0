"""Variational bound on the NLL in bits/dim of the model's K-step ancestral chain (Ho et al. 2020, eq. 5):

    L = L_T + sum_{k=2}^{K} L_{k-1} + L_0 >= -log p_theta(x_0)
    L_T     = KL(q(x_K | x_0) || p(x_K)),  p(x_K) = N(0, sigma_T^2 I), the schedule's prior (closed form)
    L_{k-1} = E_{x_k ~ q(x_k | x_0)} KL(q(x_{k-1} | x_k, x_0) || p_theta(x_{k-1} | x_k))
    L_0     = E_{x_1 ~ q(x_1 | x_0)} [-log p_theta(x_0 | x_1)]

- Steps t_1 < ... < t_K = T, with x_0 the data (alpha = 1, sigma = 0).  vp_discrete: K evenly strided steps of
  the schedule's own t_n = n/N (those in [t_min, T]), first and last included (Nichol & Dhariwal 2021, sec. 4;
  steps null = all of them).  Continuous schedules: t_k uniform from t_min to T (K = 1: t_1 = T); `steps` is
  required.  The chain between kept steps follows from the schedule's alpha and sigma there: for VP the betas
  recomputed from alpha-bar, beta_k = 1 - abar_k / abar_{k-1}.
- Gaussian KL terms in closed form; the expectation over x_k is a Monte-Carlo estimate with one draw per term
  and point from point i's own generator, so the value is an unbiased estimate of the bound and its standard
  error is over the points.
- Reverse mean from the model's eps (Ho et al. 2020, eq. 11); reverse variance (knob `variance`): 'posterior'
  (beta_tilde, the posterior variance) or 'beta' (the forward step's, default: the tighter bound at every K we
  measured on gmm and digits) (their sec. 3.2).  beta_tilde_1 = 0, so the decoder uses
  sigma_1^2 = beta_1 under both.
- Decoder: on L-level data in [lo, hi] the discretised Gaussian of Ho et al. 2020, eq. 13 (bins of width
  (hi - lo)/(L - 1) centred on the levels, open at lo and hi): a bound on the discrete NLL in bits/dim, the
  unit of the nll metric's dequantised bound.  On continuous data (gmm, toy2d) the Gaussian density
  N(x_0; mu_1, sigma_1^2 I): a bound on the NLL of a continuous density.
- Points: those of the nll metric (bench.metrics.nll.data_points, same seed, same points; not dequantised).
- The value does not depend on the run's solver or samples (protocol solver: none); it is cached on disk by
  model (config and weights) and protocol.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.metrics import Metric, MetricContext, register_metric
from bench.metrics.cache import cached, model_fingerprint
from bench.metrics.columns import book, quality
from bench.metrics.nll import data_points, discrete_points, levels, points_kind
from bench.models.dynamics import Dynamics
from bench.models.errors import ConfigError
from bench.solvers.rng import PerSampleRNG

VARIANCES = ("posterior", "beta")   # posterior = beta-tilde
X_T_STREAM = 1 << 43         # generator stream offset of the x_k draws (nll uses 1 << 41 and 1 << 42)

ELBO_WHAT = ("Monte-Carlo estimate (one draw of x_t per term and point) of the DDPM variational upper bound on the "
             "NLL of the model's K-step ancestral chain: on L-level data the discrete NLL (discretised Gaussian "
             "decoder), on continuous data the NLL of a continuous density (Gaussian decoder density)")


@dataclass
class Chain:
    """The K-step Gaussian chain at times t (float64, shape (K,)): alpha, sigma at each step, the step's own
    alpha_{k|k-1} = alpha_k / alpha_{k-1} and variance sigma^2_{k|k-1} = sigma_k^2 - alpha_{k|k-1}^2 sigma_{k-1}^2
    ("beta_k" for VP), and the posterior q(x_{k-1} | x_k, x_0) = N(c_x x_k + c_0 x_0, var_post)
    (Kingma et al. 2021, sec. 3; for VP, Ho et al. 2020, eqs. 6-7)."""
    t: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    alpha_step: torch.Tensor
    var_step: torch.Tensor
    var_post: torch.Tensor
    c_x: torch.Tensor
    c_0: torch.Tensor

    @classmethod
    def at(cls, schedule, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        a, s = schedule.alpha(t).double(), schedule.sigma(t).double()
        a_prev = torch.cat([a.new_ones(1), a[:-1]])
        s_prev = torch.cat([s.new_zeros(1), s[:-1]])
        a_step = a / a_prev
        var_step = s**2 - a_step**2 * s_prev**2
        return cls(t, a, s, a_step, var_step, var_step * s_prev**2 / s**2, a_step * s_prev**2 / s**2,
                   a_prev * var_step / s**2)

    def __len__(self):
        return len(self.t)

    def reverse_var(self, variance: str) -> torch.Tensor:
        """sigma_k^2 of p_theta(x_{k-1} | x_k): beta_tilde (var_post) or beta (var_step); step 1 (the decoder) uses
        var_step under both, since var_post_1 = 0."""
        v = self.var_post.clone() if variance == "posterior" else self.var_step.clone()
        v[0] = self.var_step[0]
        return v


def chain_times(schedule, steps):
    """(t_1..t_K, grid kind) of the K-step chain; ConfigError where `steps` does not fit the schedule."""
    t_n = getattr(schedule, "t_n", None)
    if t_n is not None:                      # vp_discrete: a strided subsequence of its own steps
        avail = t_n[(t_n >= schedule.t_min - 1e-12) & (t_n <= schedule.T + 1e-12)].double()
        N = len(avail)
        K = N if steps is None else steps
        if K > N:
            raise ConfigError(f"elbo: steps={K} but the discrete schedule has {N} steps in [t_min, T]; "
                              f"steps must be an integer in 1..{N} (null = all {N})")
        idx = torch.linspace(0, N - 1, K, dtype=torch.float64).round().long() if K > 1 else torch.tensor([N - 1])
        return avail[idx], "strided_discrete_steps"
    if steps is None:
        raise ConfigError(f"elbo: noise schedule '{schedule.name}' is continuous; metric_cfg.elbo.steps must give "
                          f"the number of steps K of its discretisation (t_k uniform from t_min to T), e.g. 1000")
    if steps == 1:
        return torch.tensor([float(schedule.T)], dtype=torch.float64), "uniform_t"
    return torch.linspace(float(schedule.t_min), float(schedule.T), steps, dtype=torch.float64), "uniform_t"


def gaussian_kl(mu_q, var_q, mu_p, var_p):
    """KL(N(mu_q, var_q I) || N(mu_p, var_p I)) summed over all but the batch dimension; var_* scalars or (batch,)."""
    d = mu_q[0].numel()
    var_q = torch.as_tensor(var_q, dtype=mu_q.dtype, device=mu_q.device)
    var_p = torch.as_tensor(var_p, dtype=mu_q.dtype, device=mu_q.device)
    sq = ((mu_q - mu_p) ** 2).flatten(1).sum(1)
    return 0.5 * (d * (torch.log(var_p / var_q) + var_q / var_p - 1) + sq / var_p)


def posterior_mean(ch: Chain, k, x_k, x0):
    """Mean of q(x_{k-1} | x_k, x_0) (Ho et al. 2020, eq. 7); k is the 0-based step index, scalar or (batch,)."""
    return _bc(ch.c_x[k], x_k) * x_k + _bc(ch.c_0[k], x_k) * x0


def model_mean(ch: Chain, k, x_k, eps):
    """Mean of p_theta(x_{k-1} | x_k) from the eps prediction (Ho et al. 2020, eq. 11):
    (x_k - sigma^2_{k|k-1} / sigma_k eps) / alpha_{k|k-1}; at k = 1 it is the x0-prediction."""
    return (x_k - _bc(ch.var_step[k] / ch.sigma[k], x_k) * eps) / _bc(ch.alpha_step[k], x_k)


def discretized_gaussian_logp(x0, mu, var, model):
    """log p(x_0 | x_1) of L-level data in [lo, hi] under N(mu, var) integrated over each level's bin (Ho et al.
    2020, eq. 13): bins of width (hi - lo)/(L - 1) centred on the levels, the first and last open; summed over
    dimensions."""
    lo, hi = model.data_range
    L = model.n_levels
    k = levels(x0, model)
    half = (hi - lo) / (L - 1) / 2
    v = lo + (hi - lo) * k / (L - 1)
    sd = torch.sqrt(torch.as_tensor(var, dtype=torch.float64, device=x0.device))
    sd = sd.reshape(-1, *([1] * (x0.dim() - 1))) if sd.dim() else sd
    a = torch.where(k == 0, torch.full_like(v, -math.inf), (v - half - mu) / sd)
    b = torch.where(k == L - 1, torch.full_like(v, math.inf), (v + half - mu) / sd)
    return log_diff_ndtr(a, b).flatten(1).sum(1)


def log_diff_ndtr(a, b):
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails (Phi(b) - Phi(a) = Phi(-a) - Phi(-b))."""
    flip = a > 0
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return lb + torch.log(-torch.expm1(la - lb))


def gaussian_logp(x0, mu, var):
    """log N(x_0; mu, var I) summed over all but the batch dimension."""
    d = x0[0].numel()
    var = torch.as_tensor(var, dtype=x0.dtype, device=x0.device)
    return -0.5 * (((x0 - mu) ** 2).flatten(1).sum(1) / var + d * torch.log(2 * math.pi * var))


def _bc(c, x):
    c = torch.as_tensor(c, dtype=x.dtype, device=x.device)
    return c.reshape(-1, *([1] * (x.dim() - 1))) if c.dim() else c


def elbo_terms(eps_fn, ch: Chain, x0, seed, indices, variance="posterior", prior_std=1.0, decoder=None,
               batch_size=1024):
    """Per point (nats): (L_T, sum_{k>=2} L_{k-1}, L_0).  eps_fn(x_k, t_k) is the model's eps (t per row); point
    indices[j] draws its K noises z_1..z_K (x_k = alpha_k x_0 + sigma_k z_k) in one call on its own generator; `decoder`
    is a callable (x0, mu, var) -> log p(x_0 | x_1), default the Gaussian density."""
    decoder = decoder or (lambda x, mu, var: gaussian_logp(x, mu, var))
    n, K, shape = x0.shape[0], len(ch), x0.shape[1:]
    var_p = ch.reverse_var(variance)
    L_T = gaussian_kl(_bc(ch.alpha[-1], x0) * x0, ch.sigma[-1] ** 2, torch.zeros_like(x0), prior_std**2)
    L_mid, L_0 = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    group = max(1, min(n, batch_size // K))
    for g0 in range(0, n, group):
        xg = x0[g0:g0 + group]
        G = xg.shape[0]
        z_all = torch.stack([torch.randn((K, *shape), dtype=torch.float64, generator=gen) for gen in
                             PerSampleRNG(seed, [X_T_STREAM + i for i in indices[g0:g0 + G]]).gens])  # (G, K, ...)
        chunk = max(1, batch_size // G)
        for k0 in range(0, K, chunk):
            ks = torch.arange(k0, min(K, k0 + chunk))
            z = z_all[:, k0:k0 + len(ks)].to(x0.device)
            kk = ks.repeat(G)                                                    # step of each row
            x_rep = xg.repeat_interleave(len(ks), 0)
            x_k = _bc(ch.alpha[kk], x_rep) * x_rep + _bc(ch.sigma[kk], x_rep) * z.reshape(-1, *shape)
            eps = eps_fn(x_k, ch.t[kk]).double()
            mu_p = model_mean(ch, kk, x_k, eps)
            kl = gaussian_kl(posterior_mean(ch, kk, x_k, x_rep), ch.var_post[kk], mu_p, var_p[kk])
            first = (kk == 0).to(x_k.device)                                     # rows of step 1: the decoder
            kl = torch.where(first, torch.zeros_like(kl), kl)
            L_mid[g0:g0 + G] += kl.reshape(G, -1).sum(1).cpu()
            if bool(first.any()):
                L_0[g0:g0 + G] -= decoder(x_rep[first], mu_p[first], var_p[0]).cpu()
    return L_T.cpu(), L_mid, L_0


@register_metric("elbo")
class ELBO(Metric):
    # checked by bench.guidance before any work: a conditional model's likelihood would need each point's label
    unconditional_only = ("it scores real data points, which carry no requested label, and a guided "
                          "sampler has no likelihood; run it on an unconditional model")
    columns = (
        quality("elbo_bpd", "ELBO bound on the NLL (bits/dim)", "bits/dim", "elbo_bpd_se", "absolute", "nll",
                nfe_dependent="solver", se_how="over the points, one draw of x_t per term", what=ELBO_WHAT),
        book("elbo_bpd_se", "standard error of elbo_bpd over the points", "bits/dim"),
        book("elbo_steps", "steps K of the chain", "steps"),
        book("elbo_n_points", "data points averaged", "points"),
        book("elbo_L_T", "prior term L_T = KL(q(x_K|x_0) || N(0, sigma_T^2 I)), mean over the points", "bits/dim"),
        book("elbo_L_sum", "sum of the K - 1 denoising KL terms L_1..L_{K-1}, mean over the points", "bits/dim"),
        book("elbo_L_0", "decoder term -log p(x_0|x_1), mean over the points", "bits/dim"),
        book("elbo_nll_exact", "analytic -log2 p(x)/D on the same points (gmm)", "bits/dim"),
        book("elbo_gap", "elbo_bpd - elbo_nll_exact, the bound's gap above the exact NLL (gmm)", "bits/dim"),
        book("elbo_gap_se", "standard error of elbo_gap, paired over the points (the data spread cancels)",
             "bits/dim"),
        book("elbo_what", "what elbo_bpd is: an estimate of a bound, and of what"),
    )

    def __init__(self, steps: int | None = None, variance: str = "beta", n_points: int = 128,
                 batch_size: int = 1024):
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ConfigError(f"elbo: steps must be null or an integer >= 1, got {steps!r}")
        if variance not in VARIANCES:
            raise ConfigError(f"elbo: unknown variance '{variance}'. Valid values are: {', '.join(VARIANCES)}.")
        for k, v, lo in (("n_points", n_points, 2), ("batch_size", batch_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"elbo: {k} must be an integer >= {lo}, got {v!r}")
        super().__init__(steps=steps, variance=variance, n_points=n_points, batch_size=batch_size)

    def _discrete(self, m) -> bool:
        return discrete_points(m, self.name)

    def protocol(self, ctx):
        m, k = ctx.model, self.knobs
        t, grid = chain_times(m.schedule, k["steps"])
        if not bool((Chain.at(m.schedule, t).var_step > 0).all()):
            raise ConfigError(f"elbo: the schedule '{m.schedule.name}' at these {len(t)} steps gives a step variance "
                              f"sigma_k^2 - (alpha_k/alpha_(k-1))^2 sigma_(k-1)^2 <= 0: not a Gaussian Markov chain")
        disc = self._discrete(m)
        return {"metric": "elbo", "units": "bits/dim", "solver": "none",
                "quantity": "discrete_nll_upper_bound" if disc else "continuous_density_nll_upper_bound",
                "estimator": "monte_carlo_one_draw_per_term",
                "decoder": "discretized_gaussian" if disc else "gaussian_density",
                "levels": m.n_levels if disc else None, "variance": k["variance"], "decoder_variance": "beta_1",
                "steps": len(t), "grid": grid, "t_first": float(t[0]), "t_last": float(t[-1]), "prior": "schedule",
                "points": points_kind(m), "n_points": k["n_points"], "dataset": m.dataset_id or m.name,
                "seed": ctx.cfg.get("seed", 0)}

    def compute(self, ctx: MetricContext) -> dict:
        """Cached on disk by model (config and weights) and protocol: one computation serves every solver and NFE."""
        key = {"model": ctx.cfg.get("model"), "weights": model_fingerprint(ctx.model), **self.protocol(ctx)}
        return cached(ctx.cfg.get("results_dir", "results"), "elbo", key, lambda: self._compute(ctx))

    def _compute(self, ctx: MetricContext) -> dict:
        m, k, seed = ctx.model, self.knobs, ctx.cfg.get("seed", 0)
        p = self.protocol(ctx)
        t, _ = chain_times(m.schedule, k["steps"])
        ch = Chain.at(m.schedule, t)
        x, _ = data_points(m, k["n_points"], seed, "elbo")
        x0 = x.double().reshape(-1, *m.shape).to(ctx.device)
        dtype = next((q.dtype for q in getattr(m.net, "parameters", lambda: [])()), torch.float64)
        dyn = Dynamics(m.net, m.schedule)

        def eps_fn(x_k, t_k):
            with torch.no_grad():
                return dyn.eps(x_k.to(dtype), t_k)

        decoder = (lambda x_, mu, var: discretized_gaussian_logp(x_, mu, var, m)) if self._discrete(m) else None
        L_T, L_mid, L_0 = elbo_terms(eps_fn, ch, x0, seed, list(range(x0.shape[0])), k["variance"],
                                     m.schedule.prior_std(), decoder, k["batch_size"])
        D = int(torch.Size(m.shape).numel())
        nats = D * math.log(2)
        bpd = (L_T + L_mid + L_0) / nats
        what = (f"Monte-Carlo estimate (one draw of x_t per term and point; {len(t)} steps, t = {p['t_first']:g} .. "
                f"{p['t_last']:g} ({p['grid']}), {k['variance']} reverse variances) of the DDPM variational upper "
                f"bound on " + (f"the discrete NLL of the {m.n_levels}-level data (discretised Gaussian decoder)"
                                if self._discrete(m) else "the NLL of a continuous density (Gaussian decoder density)")
                + f", on {p['points']}")
        out = {"elbo_bpd": float(bpd.mean()), "elbo_bpd_se": float(bpd.std() / math.sqrt(len(bpd))),
               "elbo_steps": len(t), "elbo_n_points": int(x0.shape[0]), "elbo_L_T": float(L_T.mean() / nats),
               "elbo_L_sum": float(L_mid.mean() / nats), "elbo_L_0": float(L_0.mean() / nats), "elbo_what": what}
        if m.data is not None and hasattr(m.data, "log_prob"):
            exact = -m.data.log_prob(x0.flatten(1).cpu()) / nats
            gap = bpd - exact
            out.update(elbo_nll_exact=float(exact.mean()), elbo_gap=float(gap.mean()),
                       elbo_gap_se=float(gap.std() / math.sqrt(len(gap))))
        return out
