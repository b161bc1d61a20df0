"""Upper bound on the NLL in bits/dim of the model's reverse SDE, with likelihood weighting lambda(t) = g(t)^2
(Song, Durkan, Murray & Ermon 2021, "Maximum likelihood training of score-based diffusion models", Thm. 3, the
denoising form L^DSM of the per-point bound):

    -log p_theta(x) <= -E[log pi(x_T)]
                       + 1/2 int_{t_min}^T E_{x_t ~ q(x_t | x)} [ g^2 ||s_theta(x_t, t) - grad log q(x_t | x)||^2
                                                               - g^2 ||grad log q(x_t | x)||^2 - 2 div f(x_t, t) ] dt

- The model: the reverse SDE dx = [f x - g^2 s_theta] dt + g dW-bar from the prior pi = N(0, sigma(T)^2 I) at T
  down to t_start = the schedule's t_min, where the network is trained and samplers stop.  The bound is on the
  density p_theta of x_{t_min}, evaluated at the data point x (as nll's default t_start = t_min): the theorem
  applied with time origin t_min, so the forward kernel is the one started from x at t_min,
  q(x_t | x) = N(a_t x, v_t I), a_t = alpha_t / alpha_{t_min}, v_t = sigma_t^2 - a_t^2 sigma_{t_min}^2.
  Score s_theta = -eps / sigma (bench.models.dynamics.Dynamics.score); f(x, t) = f(t) x, so div f = D f(t).
- Prior term in closed form: -E log pi(x_T) = D/2 log(2 pi sigma_T^2) + (a_T^2 ||x||^2 + D v_T) / (2 sigma_T^2).
- Time integral by Monte Carlo, n_t times per point, all drawn from point i's own generator (u_1..u_n_t, then
  z_1..z_n_t), so point i's value does not depend on batching or on the other points:
    t_sampling = uniform:     t ~ U[t_min, T], weight 1/p(t) = T - t_min;
    t_sampling = importance:  p(t) proportional to g(t)^2 / sigma(t)^2 = -2 d lambda/dt on [t_min, T], i.e. the
                              log-SNR lambda uniform on [lambda(T), lambda(t_min)], t = t(lambda), weight
                              1/p(t) = (lambda(t_min) - lambda(T)) / (-d lambda/dt).
- Each time sample draws z and uses the antithetic pair x_t = a x +- sqrt(v) z (two network calls).  Per draw,
  ||s - grad log q||^2 - ||grad log q||^2 = ||s||^2 + 2 s.z / sqrt(v) (grad log q = -z / sqrt(v)) has a variance
  ~ 1/v that makes the single-draw estimator's variance diverge (logarithmically) at t_min; the pair's mean
  1/2 (||s+||^2 + ||s-||^2) + (s+ - s-).z / sqrt(v) has the same expectation and stays bounded there.  Added to
  it is the zero-mean control variate r (2 - r) (||z||^2 - D) / v, r = v / (alpha_t^2 + sigma_t^2), whose
  coefficient cancels the z-noise exactly for unit-variance Gaussian data (near T, where ||s||^2 alone has a
  spread ~ g^2 sqrt(2D)); for any data it leaves the expectation unchanged.
- The value per point is unbiased for the bound; its standard error is over the points (each with its own t and
  z draws), so it contains both the data spread and the Monte-Carlo noise of the time integral.
- On L-level data in [lo, hi] the points are dequantised as nll does (score_sde cells) and bits_offset is added:
  a Monte-Carlo estimate of an upper bound on the discrete NLL.  On continuous data (gmm): an upper bound on
  -log p_theta(x_{t_min} = x), the continuous density of x_{t_min}.
- Points: those of the nll metric (bench.metrics.nll.data_points).  The value does not depend on the run's solver
  or samples (protocol solver: none); it is cached on disk by model (config and weights) and protocol.
"""
from __future__ import annotations

import math

import torch

from bench.metrics import Metric, MetricContext, register_metric
from bench.metrics.cache import cached, model_fingerprint
from bench.metrics.columns import book, quality
from bench.metrics.nll import bits_offset, data_points, dequantize, discrete_points, points_kind
from bench.models.dynamics import Dynamics
from bench.models.errors import ConfigError
from bench.solvers.rng import PerSampleRNG

T_SAMPLINGS = ("importance", "uniform")
SDE_STREAM = 1 << 44         # generator stream of the (t, z) draws (nll: 1 << 41, 1 << 42; elbo: 1 << 43)
CELLS = "score_sde"          # dequantisation cells on L-level data (nll's default)

SDE_BOUND_WHAT = ("Monte-Carlo estimate (n_t time samples per point, an antithetic pair of x_t draws each) of the "
                  "reverse SDE's upper bound on the NLL (Song et al. 2021, likelihood weighting g^2): on continuous "
                  "data of the density of x_{t_min} at the data point, on L-level data of the discrete NLL "
                  "(uniform dequantisation)")


def forward_kernel(schedule, t, t0):
    """(a_t, v_t) of q(x_t | x_{t0} = x) = N(a_t x, v_t I): a_t = alpha_t / alpha_t0,
    v_t = sigma_t^2 - a_t^2 sigma_t0^2."""
    t = torch.as_tensor(t, dtype=torch.float64)
    a = torch.exp(schedule.log_alpha(t) - schedule.log_alpha(torch.as_tensor(t0, dtype=torch.float64)))
    return a, schedule.sigma(t) ** 2 - a**2 * float(schedule.sigma(t0)) ** 2


def prior_term(schedule, x, t0):
    """-E_{x_T ~ q(x_T | x)} log N(x_T; 0, sigma_T^2 I) in closed form (nats, per point)."""
    a, v = forward_kernel(schedule, schedule.T, t0)
    s2, D = schedule.prior_std() ** 2, x[0].numel()
    return 0.5 * D * math.log(2 * math.pi * s2) + (a**2 * (x.flatten(1) ** 2).sum(1) + D * v) / (2 * s2)


def draw_times(schedule, u, t_sampling):
    """Times t in [t_min, T] from uniforms u and their weights 1/p(t) (see the module docstring)."""
    t0, T = float(schedule.t_min), float(schedule.T)
    if t_sampling == "uniform":
        return t0 + u * (T - t0), torch.full_like(u, T - t0)
    lam_hi, lam_lo = float(schedule.lambda_(t0)), float(schedule.lambda_(T))
    t = schedule.t_of_lambda(lam_lo + u * (lam_hi - lam_lo)).double().clamp(t0, T)
    return t, (lam_hi - lam_lo) / (-schedule.d_lambda(t).double())


def integrand(score_fn, schedule, x, t, z, t0):
    """Per row: 1/2 g^2 E[||s - grad log q||^2 - ||grad log q||^2] - div f at (x, t), estimated by the antithetic
    pair x_t = a x +- sqrt(v) z (Song et al. 2021, Thm. 3, the L^DSM integrand)."""
    a, v = forward_kernel(schedule, t, t0)
    sv = v.sqrt()
    bc = lambda c: c.reshape(-1, *([1] * (x.dim() - 1))).to(x)                  # noqa: E731
    s = score_fn(torch.cat([bc(a) * x + bc(sv) * z, bc(a) * x - bc(sv) * z]), torch.cat([t, t])).double()
    sp, sm = s.chunk(2)
    sq = 0.5 * ((sp**2).flatten(1).sum(1) + (sm**2).flatten(1).sum(1))
    cross = ((sp - sm) * z).flatten(1).sum(1) / sv.to(x)
    D = x[0].numel()
    r = (v / (schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2)).to(x)        # v / V_t for unit-variance data
    cv = r * (2 - r) * ((z**2).flatten(1).sum(1) - D) / v.to(x)                # control variate, mean zero
    return 0.5 * schedule.g2(t).to(x) * (sq + cross + cv) - D * schedule.f(t).to(x)


def sde_bound_terms(score_fn, schedule, x, seed, indices, n_t, t_sampling="importance", batch_size=4096):
    """Per point (nats): (prior term, time-integral estimate).  score_fn(x_t, t) is the model's score (t per row)."""
    t0 = float(schedule.t_min)
    n, shape = x.shape[0], x.shape[1:]
    prior = prior_term(schedule, x, t0)
    gens = PerSampleRNG(seed, [SDE_STREAM + i for i in indices]).gens
    u = torch.empty(n, n_t, dtype=torch.float64)
    z = torch.empty(n, n_t, *shape, dtype=torch.float64)
    for j, g in enumerate(gens):                  # point j's draws: its n_t uniforms, then its n_t normals
        u[j] = torch.rand(n_t, dtype=torch.float64, generator=g)
        z[j] = torch.randn((n_t, *shape), dtype=torch.float64, generator=g)
    t, w = draw_times(schedule, u.flatten(), t_sampling)
    rows = x.repeat_interleave(n_t, 0)
    z = z.reshape(-1, *shape).to(x.device)
    vals = torch.empty(n * n_t, dtype=torch.float64)
    chunk = max(1, batch_size // 2)               # two network rows per time sample (the antithetic pair)
    for r0 in range(0, n * n_t, chunk):
        sl = slice(r0, r0 + chunk)
        vals[sl] = w[sl] * integrand(score_fn, schedule, rows[sl], t[sl], z[sl], t0).cpu()
    return prior.cpu(), vals.reshape(n, n_t).mean(1)


@register_metric("sde_bound")
class SDEBound(Metric):
    # checked by bench.guidance before any work: a conditional model's likelihood would need each point's label
    unconditional_only = ("it scores real data points, which carry no requested label, and a guided "
                          "sampler has no likelihood; run it on an unconditional model")
    columns = (
        quality("sde_bound_bpd", "reverse-SDE bound on the NLL (bits/dim)", "bits/dim", "sde_bound_bpd_se",
                "absolute", "nll", nfe_dependent="solver",
                se_how="over the points, n_t time samples per point", what=SDE_BOUND_WHAT),
        book("sde_bound_bpd_se", "standard error of sde_bound_bpd over the points (includes the time-integral "
             "Monte-Carlo noise)", "bits/dim"),
        book("sde_bound_n_t", "time samples per point", "samples"),
        book("sde_bound_n_points", "data points averaged", "points"),
        book("sde_bound_prior", "prior term -E log pi(x_T), mean over the points", "bits/dim"),
        book("sde_bound_nll_exact", "analytic -log2 q_{t_min}(x)/D on the same points (gmm): the NLL the bound "
             "is above", "bits/dim"),
        book("sde_bound_gap", "sde_bound_bpd - sde_bound_nll_exact (gmm)", "bits/dim"),
        book("sde_bound_gap_se", "standard error of sde_bound_gap, paired over the points", "bits/dim"),
        book("sde_bound_what", "what sde_bound_bpd is: an estimate of a bound, and of what"),
    )

    def __init__(self, n_points: int = 128, n_t: int = 64, t_sampling: str = "importance",
                 batch_size: int = 4096):
        for k, v, lo in (("n_points", n_points, 2), ("n_t", n_t, 1), ("batch_size", batch_size, 2)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"sde_bound: {k} must be an integer >= {lo}, got {v!r}")
        if t_sampling not in T_SAMPLINGS:
            raise ConfigError(f"sde_bound: unknown t_sampling '{t_sampling}'. "
                              f"Valid values are: {', '.join(T_SAMPLINGS)}.")
        super().__init__(n_points=n_points, n_t=n_t, t_sampling=t_sampling, batch_size=batch_size)

    def _discrete(self, m) -> bool:
        return discrete_points(m, self.name)

    def protocol(self, ctx):
        m, k = ctx.model, self.knobs
        disc = self._discrete(m)
        return {"metric": "sde_bound", "units": "bits/dim", "solver": "none",
                "quantity": "discrete_nll_upper_bound" if disc else "continuous_density_nll_upper_bound",
                "estimator": "monte_carlo_time_antithetic_x_t", "weighting": "likelihood_g2",
                "t_sampling": k["t_sampling"], "n_t": k["n_t"], "t_start": float(m.schedule.t_min),
                "T": float(m.schedule.T), "prior": "schedule", "cells": CELLS if disc else None,
                "bits_offset": bits_offset(m, CELLS), "points": points_kind(m), "n_points": k["n_points"],
                "dataset": m.dataset_id or m.name, "seed": ctx.cfg.get("seed", 0)}

    def compute(self, ctx: MetricContext) -> dict:
        """Cached on disk by model (config and weights) and protocol: one computation serves every solver and NFE."""
        key = {"model": ctx.cfg.get("model"), "weights": model_fingerprint(ctx.model), **self.protocol(ctx)}
        return cached(ctx.cfg.get("results_dir", "results"), "sde_bound", key, lambda: self._compute(ctx))

    def _compute(self, ctx: MetricContext) -> dict:
        m, k, seed = ctx.model, self.knobs, ctx.cfg.get("seed", 0)
        p = self.protocol(ctx)
        x, _ = data_points(m, k["n_points"], seed, "sde_bound")
        if self._discrete(m):
            x = dequantize(x, m, seed, range(x.shape[0]), CELLS)
        x = x.double().reshape(-1, *m.shape).to(ctx.device)
        dtype = next((q.dtype for q in getattr(m.net, "parameters", lambda: [])()), torch.float64)
        dyn = Dynamics(m.net, m.schedule)

        def score_fn(x_t, t):
            with torch.no_grad():
                return dyn.score(x_t.to(dtype), t)

        prior, integral = sde_bound_terms(score_fn, m.schedule, x, seed, list(range(x.shape[0])), k["n_t"],
                                          k["t_sampling"], k["batch_size"])
        D = int(torch.Size(m.shape).numel())
        nats = D * math.log(2)
        off = bits_offset(m, CELLS)
        bpd = (prior + integral) / nats + off
        what = (f"Monte-Carlo estimate ({k['n_t']} {k['t_sampling']} time samples per point on [{p['t_start']:g}, "
                f"{p['T']:g}], an antithetic pair of x_t draws each) of the reverse SDE's likelihood-weighted upper "
                f"bound on " + (f"the discrete NLL of the {m.n_levels}-level data (uniform dequantisation, "
                                f"{CELLS} cells)" if self._discrete(m)
                                else "-log p(x_{t_min}), the NLL of the model's continuous density at t_min")
                + f", on {p['points']}")
        out = {"sde_bound_bpd": float(bpd.mean()), "sde_bound_bpd_se": float(bpd.std() / math.sqrt(len(bpd))),
               "sde_bound_n_t": k["n_t"], "sde_bound_n_points": int(x.shape[0]),
               "sde_bound_prior": float(prior.mean() / nats), "sde_bound_what": what}
        if m.data is not None and hasattr(m.data, "log_prob_t"):
            sch = m.schedule
            exact = -m.data.log_prob_t(x.flatten(1).cpu(), sch.alpha(sch.t_min), sch.sigma(sch.t_min)) / nats
            gap = bpd - exact
            out.update(sde_bound_nll_exact=float(exact.mean()), sde_bound_gap=float(gap.mean()),
                       sde_bound_gap_se=float(gap.std() / math.sqrt(len(gap))))
        return out
