"""The elbo metric: the DDPM variational bound (Ho et al. 2020, eq. 5) of the model's K-step chain, in bits/dim.

Closed forms against independent paths (torch.distributions, Ho et al.'s beta/alpha-bar formulas, scipy's normal
cdf), each KL term of the exact gmm model against a Monte-Carlo estimate of E log q/p from forward-chain samples,
the bound above the exact NLL per configuration and falling towards it with K, knobs checked before work, and the
metric end to end through the command line."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch.distributions import Normal, kl_divergence

from bench import store
from bench.metrics import cache, make_metric
from bench.metrics.columns import all_columns, column_owner
from bench.metrics.elbo import (Chain, chain_times, discretized_gaussian_logp, elbo_terms, gaussian_kl,
                                gaussian_logp, model_mean, posterior_mean)
from bench.models.dynamics import Dynamics
from bench.models.errors import ConfigError
from bench.models.registry import load_model
from metric_helpers import make_ctx, tiny_image_model

LN2 = math.log(2)


def gmm(schedule="vp_linear", **kw):
    return load_model({"name": "gmm", "schedule": {"name": schedule, **kw}})


def per_point_bound(model, K, variance, n, seed=0, batch_size=1 << 16):
    """Per point: (bound, exact -log2 p) in bits/dim on the nll/elbo points of `seed`."""
    from bench.metrics.nll import data_points

    x0, _ = data_points(model, n, seed)
    t, _ = chain_times(model.schedule, K)
    dyn = Dynamics(model.net, model.schedule)
    L_T, L_mid, L_0 = elbo_terms(dyn.eps, Chain.at(model.schedule, t), x0, seed, list(range(n)), variance,
                                 model.schedule.prior_std(), None, batch_size)
    D = x0[0].numel()
    return (L_T + L_mid + L_0) / (D * LN2), -model.data.log_prob(x0) / (D * LN2)


def mean_se(v):
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


# ----------------------------------------------------------------------------------------- closed forms
def test_gaussian_kl_and_decoder_density_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu_q, mu_p = torch.randn(5, 3, 2, generator=g, dtype=torch.float64), torch.randn(5, 3, 2, generator=g,
                                                                                       dtype=torch.float64)
    for var_q, var_p in ((0.3, 0.7), (2.0, 0.05), (torch.rand(5, dtype=torch.float64) + 0.1, 0.4)):
        vq = torch.as_tensor(var_q, dtype=torch.float64).reshape(-1, 1, 1)
        vp = torch.as_tensor(var_p, dtype=torch.float64).reshape(-1, 1, 1)
        ref = kl_divergence(Normal(mu_q, vq.sqrt().expand_as(mu_q)), Normal(mu_p, vp.sqrt().expand_as(mu_p)))
        assert torch.allclose(gaussian_kl(mu_q, var_q, mu_p, var_p), ref.flatten(1).sum(1), rtol=1e-12)
    ref = Normal(mu_p, 0.3).log_prob(mu_q).flatten(1).sum(1)
    assert torch.allclose(gaussian_logp(mu_q, mu_p, 0.09), ref, rtol=1e-12)


def test_chain_is_ddpm_with_betas_recomputed_from_alpha_bar_of_the_kept_steps():
    m = gmm("vp_discrete")
    betas = m.schedule.betas
    abar = torch.cumprod(1 - betas, 0)
    for K in (1000, 10, 1):
        t, kind = chain_times(m.schedule, K)
        assert kind == "strided_discrete_steps" and len(t) == K
        # Nichol & Dhariwal's even striding: K steps of 1..N, the first (unless K = 1) and the last included
        S = np.round(np.linspace(0, 999, K)).astype(int) if K > 1 else np.array([999])
        assert torch.allclose(t, torch.as_tensor((S + 1) / 1000, dtype=torch.float64))
        ch = Chain.at(m.schedule, t)
        a_bar = abar[S]
        a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a_bar[:-1]])
        beta = 1 - a_bar / a_prev                                   # recomputed betas of the kept steps
        assert torch.allclose(ch.var_step, beta, rtol=1e-9, atol=1e-15)
        beta_tilde = (1 - a_prev) / (1 - a_bar) * beta             # Ho et al. 2020, eq. 7
        assert torch.allclose(ch.var_post, beta_tilde, rtol=1e-9, atol=1e-15)
        assert torch.allclose(ch.c_0, a_prev.sqrt() * beta / (1 - a_bar), rtol=1e-9)
        assert torch.allclose(ch.c_x, (1 - beta).sqrt() * (1 - a_prev) / (1 - a_bar), rtol=1e-9)
        for variance in ("beta", "posterior"):                     # the decoder's sigma_1^2 = beta_1 under both
            assert torch.allclose(ch.reverse_var(variance)[0], beta[0])
        # eq. 11: mu = (x_k - beta / sqrt(1 - abar) eps) / sqrt(alpha), here per row with its own step
        g = torch.Generator().manual_seed(1)
        x, eps = torch.randn(K, 4, generator=g, dtype=torch.float64), torch.randn(K, 4, generator=g,
                                                                                  dtype=torch.float64)
        kk = torch.arange(K)
        ref = (x - (beta / (1 - a_bar).sqrt())[:, None] * eps) / (1 - beta).sqrt()[:, None]
        assert torch.allclose(model_mean(ch, kk, x, eps), ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(Chain.at(m.schedule, chain_times(m.schedule, None)[0]).var_step, betas, rtol=1e-9)


def test_continuous_schedules_take_a_uniform_grid_from_t_min_to_T():
    m = gmm()
    t, kind = chain_times(m.schedule, 5)
    assert kind == "uniform_t" and torch.allclose(t, torch.linspace(1e-3, 1.0, 5, dtype=torch.float64))
    assert chain_times(m.schedule, 1)[0].tolist() == [1.0]


@pytest.mark.parametrize("variance", ["posterior", "beta"])
@pytest.mark.parametrize("schedule,K,k", [("vp_linear", 10, 3), ("ve", 10, 5), ("vp_discrete", 20, 1)])
def test_kl_term_of_the_exact_model_equals_a_monte_carlo_of_log_q_over_p(schedule, K, k, variance):
    """E_{x_k|x_0} KL(q(x_{k-1}|x_k,x_0) || p(x_{k-1}|x_k)) as the metric computes it (closed-form KL, x_k drawn)
    against E log q(x_{k-1}|x_k,x_0)/p(x_{k-1}|x_k) over (x_{k-1}, x_k) drawn forward from x_0, with q by Bayes
    from the forward Gaussians: the same expectation by two independent routes, within their standard errors."""
    m = gmm(schedule)
    t, _ = chain_times(m.schedule, K)
    ch = Chain.at(m.schedule, t)
    a, s = m.schedule.alpha(t), m.schedule.sigma(t)
    a1, s1, a2, s2 = float(a[k - 1]), float(s[k - 1]), float(a[k]), float(s[k])     # steps k-1 and k (0-based)
    x0 = m.data.sample(1, generator=torch.Generator().manual_seed(2))
    M = 100_000
    g = torch.Generator().manual_seed(3)
    dyn = Dynamics(m.net, m.schedule)
    # metric route: x_k ~ q(x_k | x_0), closed-form KL
    x_k = a2 * x0 + s2 * torch.randn(M, 4, generator=g, dtype=torch.float64)
    x0s = x0.expand(M, 4)
    kk = torch.full((M,), k)
    var_p = ch.reverse_var(variance)[k]
    kl = gaussian_kl(posterior_mean(ch, kk, x_k, x0s), ch.var_post[k], model_mean(ch, kk, x_k, dyn.eps(x_k, t[kk])),
                     var_p)
    # forward route: x_{k-1} ~ q(x_{k-1} | x_0), x_k ~ q(x_k | x_{k-1}); Bayes for q(x_{k-1} | x_k, x_0)
    a21, v21 = a2 / a1, s2**2 - (a2 / a1) ** 2 * s1**2
    x_prev = a1 * x0 + s1 * torch.randn(M, 4, generator=g, dtype=torch.float64)
    x_k = a21 * x_prev + math.sqrt(v21) * torch.randn(M, 4, generator=g, dtype=torch.float64)
    log_q = (Normal(a21 * x_prev, math.sqrt(v21)).log_prob(x_k) + Normal(a1 * x0, s1).log_prob(x_prev)
             - Normal(a2 * x0, s2).log_prob(x_k)).sum(1)
    eps = dyn.eps(x_k, torch.full((M,), float(t[k]), dtype=torch.float64))
    mean_p = (x_k - v21 / s2 * eps) / a21                                   # Ho et al. 2020, eq. 11
    log_p = Normal(mean_p, math.sqrt(float(var_p))).log_prob(x_prev).sum(1)
    (m1, se1), (m2, se2) = mean_se(kl), mean_se(log_q - log_p)
    assert m1 > 0.01                                                        # a term worth testing
    assert abs(m1 - m2) < 4 * math.hypot(se1, se2), (m1, se1, m2, se2)
    assert se1 < 0.05 * m1


def test_prior_term_is_the_closed_form_kl_to_the_schedule_prior():
    m = gmm()
    x0 = m.data.sample(3, generator=torch.Generator().manual_seed(5))
    t, _ = chain_times(m.schedule, 4)
    ch = Chain.at(m.schedule, t)
    L_T, _, _ = elbo_terms(Dynamics(m.net, m.schedule).eps, ch, x0, 0, [0, 1, 2], prior_std=0.9)
    aT, sT = float(m.schedule.alpha(1.0)), float(m.schedule.sigma(1.0))
    ref = kl_divergence(Normal(aT * x0, sT), Normal(torch.zeros_like(x0), 0.9)).sum(1)
    assert torch.allclose(L_T, ref, rtol=1e-12)


def test_discretized_decoder_is_a_distribution_over_the_levels_and_matches_the_normal_cdf():
    model, _ = tiny_image_model(shape=(1,), levels=17)
    v = torch.linspace(-1, 1, 17, dtype=torch.float64).reshape(17, 1)
    for mu, var in ((0.13, 0.01), (-0.97, 0.3), (0.5, 1e-4), (3.0, 0.01)):
        lp = discretized_gaussian_logp(v, torch.full_like(v, mu), var, model)
        sd, h = math.sqrt(var), 1 / 16
        lo = np.where(np.arange(17) == 0, -np.inf, (v.flatten().numpy() - h - mu) / sd)
        hi = np.where(np.arange(17) == 16, np.inf, (v.flatten().numpy() + h - mu) / sd)
        with np.errstate(divide="ignore"):           # P(lo < z < hi) from the nearer tail (no cancellation)
            ref = np.log(np.where(lo > 0, norm.sf(lo) - norm.sf(hi), norm.cdf(hi) - norm.cdf(lo)))
        finite = np.isfinite(ref)
        assert finite.sum() >= 2
        np.testing.assert_allclose(lp.numpy()[finite], ref[finite], rtol=1e-9, atol=1e-14)
        assert math.isclose(float(torch.logsumexp(lp, 0)), 0.0, abs_tol=1e-12)      # sums to 1 over the levels
        assert torch.isfinite(lp).all()                                             # far tails stay finite


def test_per_point_values_do_not_depend_on_batching_or_on_the_other_points():
    m = gmm()
    from bench.metrics.nll import data_points
    x0, _ = data_points(m, 10, 0)
    ch = Chain.at(m.schedule, chain_times(m.schedule, 30)[0])
    eps = Dynamics(m.net, m.schedule).eps
    full = elbo_terms(eps, ch, x0, 0, list(range(10)), batch_size=7)
    part = elbo_terms(eps, ch, x0[5:], 0, list(range(5, 10)), batch_size=4096)
    for a, b in zip(full, part):
        assert torch.allclose(a[5:], b, rtol=1e-12, atol=1e-12)
    other_seed = elbo_terms(eps, ch, x0, 1, list(range(10)))
    assert not torch.allclose(full[1], other_seed[1])


# ------------------------------------------------------------------------ the bound against the exact NLL
@pytest.mark.parametrize("schedule,K,variance,n", [
    ("vp_linear", 10, "beta", 2048), ("vp_linear", 10, "posterior", 2048), ("vp_linear", 100, "beta", 1024),
    ("ve", 100, "posterior", 1024), ("vp_discrete", 10, "beta", 2048), ("vp_discrete", 1, "beta", 2048),
])
def test_bound_is_above_the_exact_nll(schedule, K, variance, n):
    """Cross-entropy >= entropy: the mean bound over exact data samples is at least the mean exact -log2 q(x_0);
    paired over the same points, within 3 standard errors."""
    bound, exact = per_point_bound(gmm(schedule), K, variance, n)
    gap, se = mean_se(bound - exact)
    assert gap > -3 * se, (gap, se)


def test_bound_falls_towards_the_nll_as_steps_grow():
    """K = 10 -> 100 on vp_linear: both variance choices fall, beta_tilde by orders of magnitude (its reverse
    variance is far too small on coarse steps)."""
    m = gmm()
    gaps = {}
    for variance in ("posterior", "beta"):
        for K in (10, 100):
            bound, exact = per_point_bound(m, K, variance, 1024)
            gaps[variance, K] = mean_se(bound - exact)
    (b10, s10), (b100, s100) = gaps["beta", 10], gaps["beta", 100]
    assert b10 - b100 > 4 * math.hypot(s10, s100) and 0.1 < b10 < 0.5 and abs(b100) < 0.1
    assert gaps["posterior", 10][0] > 100 > gaps["posterior", 100][0] > 5


@pytest.mark.slow
def test_bound_at_1000_steps_is_within_its_error_of_the_nll():
    m = gmm()
    out = {}
    for variance in ("posterior", "beta"):
        for K in (100, 1000):
            bound, exact = per_point_bound(m, K, variance, 2048)
            out[variance, K] = mean_se(bound - exact)
    g, se = out["beta", 1000]
    assert -3 * se < g < 0.05 + 3 * se
    g_t, se_t = out["posterior", 1000]
    assert out["posterior", 100][0] > g_t > 3 * se_t and g_t < 1.0     # beta_tilde is still loose at K = 1000


def test_discrete_bound_is_above_the_entropy_of_the_quantised_data(tmp_path):
    """The tiny image model's data are N(0, 0.15) per dimension quantised to 17 levels, whose probabilities are the
    Gaussian's mass on the centred bins (open at the ends): -log2 P_data(x) is exact, and both the elbo's discrete
    bound and nll's dequantised bound (either cell convention) lie above it within their standard errors.  (The
    network is that of the continuous Gaussian, so the elbo is loose here: the chain's last steps pay for spikes
    at the levels that its model does not have.)"""
    model, _ = tiny_image_model(shape=(1, 2, 2), levels=17)
    ctx = make_ctx(model, torch.zeros(4, 1, 2, 2), tmp_path)
    n = 256
    x = model.real_data("test")[:n].double().flatten(1).numpy()
    sd, h = math.sqrt(0.15), 1 / 16
    lo = np.where(x <= -1, -np.inf, (x - h) / sd)
    hi = np.where(x >= 1, np.inf, (x + h) / sd)
    H = float((-np.log2(norm.cdf(hi) - norm.cdf(lo)).sum(1) / 4).mean())
    out = make_metric("elbo", {"steps": 200, "variance": "beta", "n_points": n}).compute(ctx)
    assert out["elbo_bpd"] > H - 3 * out["elbo_bpd_se"]
    assert out["elbo_L_0"] < 0.05                            # sigma_1 = 0.01 is far inside a bin of width 1/8
    assert out["elbo_bpd"] == pytest.approx(out["elbo_L_T"] + out["elbo_L_sum"] + out["elbo_L_0"], abs=1e-12)
    assert make_metric("elbo", {"steps": 200}).protocol(ctx)["decoder"] == "discretized_gaussian"
    for cells in ("score_sde", "centred"):
        nll = make_metric("nll", {"cells": cells, "n_points": n, "divergence": "exact"}).compute(ctx)
        assert nll["nll_bpd"] > H - 3 * nll["nll_bpd_se"], cells
        assert "upper bound on the discrete NLL of the 17-level data" in nll["nll_what"]


# ------------------------------------------------------------------------------------- knobs and the row
@pytest.mark.parametrize("knobs,needle", [
    ({"steps": 0}, "steps must be null or an integer >= 1"),
    ({"steps": -3}, "steps must be null or an integer >= 1"),
    ({"steps": 2.5}, "steps must be null or an integer >= 1"),
    ({"steps": "10"}, "steps must be null or an integer >= 1"),
    ({"steps": True}, "steps must be null or an integer >= 1"),
    ({"variance": "learned"}, "Valid values are: posterior, beta"),
    ({"n_points": 1}, "n_points must be an integer >= 2"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
])
def test_bad_knobs_are_config_errors(knobs, needle):
    with pytest.raises(ConfigError, match=needle):
        make_metric("elbo", knobs)


def test_steps_that_do_not_fit_the_schedule_are_config_errors_before_work(tmp_path):
    before = cache.computed["elbo"]
    ctx = make_ctx(gmm(), torch.zeros(2, 4), tmp_path)
    with pytest.raises(ConfigError, match="continuous; metric_cfg.elbo.steps must give"):
        make_metric("elbo", {}).compute(ctx)
    ctx = make_ctx(gmm("vp_discrete", num_steps=50), torch.zeros(2, 4), tmp_path)
    with pytest.raises(ConfigError, match="steps must be an integer in 1..50"):
        make_metric("elbo", {"steps": 51}).compute(ctx)
    assert make_metric("elbo", {}).protocol(ctx)["steps"] == 50
    assert cache.computed["elbo"] == before


def test_columns_are_declared_with_what_they_are():
    cols, owner = all_columns(), column_owner()
    for name in ("elbo_bpd", "elbo_bpd_se", "elbo_steps", "elbo_n_points", "elbo_L_T", "elbo_L_sum", "elbo_L_0",
                 "elbo_nll_exact", "elbo_gap", "elbo_gap_se", "elbo_what"):
        assert owner[name] == "elbo"
    assert cols["elbo_bpd"].quality and cols["elbo_bpd"].se == "elbo_bpd_se" and cols["elbo_bpd"].nfe_dependent
    assert "upper bound" in cols["elbo_bpd"].what and "upper bound" in cols["nll_bpd"].what


from test_faults import run_cli  # noqa: E402  (the command line in this process)


def test_elbo_runs_through_the_command_line_once_for_every_solver(tmp_path):
    common = ["model=gmm", "nfe=4", "n_samples=8", "metrics=[elbo]", "metric_cfg.elbo.steps=10",
              "metric_cfg.elbo.n_points=1024", "metric_cfg.elbo.variance=beta", "progress=false",
              f"results_dir={tmp_path}"]
    before = cache.computed["elbo"]
    for solver in ("euler", "heun"):
        rc, out, err = run_cli("run", f"solver={solver}", *common)
        assert rc == 0, err
        assert "elbo_bpd" in out and "elbo_what" in out
    assert cache.computed["elbo"] == before + 1                   # the second solver reads the cached value
    rows = store.load_runs(tmp_path)
    assert len(rows) == 2
    import json
    r = rows.iloc[0]
    mets = json.loads(r["metrics"]) if isinstance(r["metrics"], str) else r["metrics"]
    proto = (json.loads(r["protocols"]) if isinstance(r["protocols"], str) else r["protocols"])["elbo"]
    assert mets["elbo_steps"] == 10 and mets["elbo_n_points"] == 1024 and proto["solver"] == "none"
    assert proto["decoder"] == "gaussian_density" and proto["variance"] == "beta" and proto["grid"] == "uniform_t"
    assert mets["elbo_bpd"] == pytest.approx(mets["elbo_L_T"] + mets["elbo_L_sum"] + mets["elbo_L_0"], abs=1e-12)
    assert mets["elbo_gap"] == pytest.approx(mets["elbo_bpd"] - mets["elbo_nll_exact"], abs=1e-12)
    assert 3 * mets["elbo_gap_se"] < mets["elbo_gap"] < 1.0      # K = 10 with beta: clearly above (~0.24)
    assert mets["elbo_gap_se"] < mets["elbo_bpd_se"]             # paired: the data spread cancels
    # the report captions say what the number is, and do not plot it against NFE
    rc, out, err = run_cli("report", f"results_dir={tmp_path}")
    assert rc == 0, err
    md = (tmp_path / "report" / "gmm" / "report.md").read_text()
    assert "variational upper bound" in md and "does not depend on the sampler" in md
    assert "metric_cfg.nll.solver=run" not in md
