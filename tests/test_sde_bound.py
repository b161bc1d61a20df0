"""The sde_bound metric: the reverse SDE's likelihood-weighted bound on the NLL (Song et al. 2021, Thm. 3, L^DSM).

A single Gaussian data set N(mu, s^2 I) has Gaussian q_t and a linear exact score, so every expectation over x_t
is a closed form and the time integral a fixed Gauss-Legendre rule: the Monte-Carlo metric must agree with it.
With the exact score the bound is tight up to the prior mismatch q_T != N(0, sigma_T^2 I) (the model's path
measure given x_{t_min} = x is then the forward process started at x), so on gmm the bound equals the exact
-log q_{t_min}(x) within its standard error.  Both t-samplings agree; knobs are checked before work; the metric
runs end to end through the command line."""
import json
import math

import numpy as np
import pytest
import torch

from bench import store
from bench.metrics import cache, make_metric
from bench.metrics.columns import all_columns, column_owner
from bench.metrics.nll import data_points
from bench.metrics.sde_bound import draw_times, prior_term, sde_bound_terms
from bench.models.dynamics import Dynamics
from bench.models.errors import ConfigError
from bench.models.gmm import GaussianMixture, GMMEps
from bench.models.registry import LoadedModel, load_model
from metric_helpers import make_ctx

LN2 = math.log(2)
MU, S2, D = [0.5, -1.0, 0.25], 0.3, 3


def gmm(schedule="vp_linear", **kw):
    return load_model({"name": "gmm", "schedule": {"name": schedule, **kw}})


def gaussian_model(schedule="vp_linear"):
    from bench.models.schedules import make_schedule
    sch = make_schedule(schedule)
    data = GaussianMixture([1.0], [MU], [(S2 * torch.eye(D)).tolist()])
    return LoadedModel("gauss", GMMEps(data, sch), sch, (D,), data=data)


def closed_form_bound(sch, x, n_nodes=128):
    """Per point (nats): the bound for data N(mu, s^2 I) and its exact score s = -(x_t - alpha mu) / V_t,
    V_t = alpha^2 s^2 + sigma^2.  With x_t = a x + sqrt(v) z ~ q(x_t | x_{t_min} = x):
      E||s - grad log q||^2 - E||grad log q||^2 = E||s||^2 + 2 E[s.z]/sqrt(v) = (||a x - alpha mu||^2 + D v)/V^2 - 2D/V
    and the time integral by an n_nodes-point Gauss-Legendre rule on [t_min, T]; the prior term independently."""
    t0, T = float(sch.t_min), float(sch.T)
    nodes, weights = np.polynomial.legendre.leggauss(n_nodes)
    t = torch.as_tensor(t0 + (nodes + 1) * (T - t0) / 2, dtype=torch.float64)
    w = torch.as_tensor(weights * (T - t0) / 2, dtype=torch.float64)
    al, sg = sch.alpha(t), sch.sigma(t)
    a = al / sch.alpha(t0)
    v = sg**2 - a**2 * sch.sigma(t0) ** 2
    V = al**2 * S2 + sg**2
    mu = torch.tensor(MU, dtype=torch.float64)
    dev = ((a[None, :, None] * x[:, None, :] - al[None, :, None] * mu) ** 2).sum(-1)     # (n, nodes)
    h = 0.5 * sch.g2(t) * ((dev + D * v) / V**2 - 2 * D / V) - D * sch.f(t)
    aT, sT2 = float(sch.alpha(T) / sch.alpha(t0)), sch.prior_std() ** 2
    vT = float(sch.sigma(T) ** 2 - aT**2 * sch.sigma(t0) ** 2)
    prior = 0.5 * D * math.log(2 * math.pi * sT2) + (aT**2 * (x**2).sum(1) + D * vT) / (2 * sT2)
    return prior + (h * w).sum(1)


def exact_nll_tmin(model, x):
    sch = model.schedule
    return -model.data.log_prob_t(x, sch.alpha(sch.t_min), sch.sigma(sch.t_min))


def mean_se(v):
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


# ------------------------------------------------------------------------------------------------ closed forms
def test_prior_term_is_the_cross_entropy_against_the_schedule_prior():
    m = gaussian_model()
    sch = m.schedule
    x = torch.randn(5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = float(sch.alpha(sch.T) / sch.alpha(sch.t_min))
    v = float(sch.sigma(sch.T) ** 2 - a**2 * sch.sigma(sch.t_min) ** 2)
    xT = a * x[:, None] + math.sqrt(v) * torch.randn(5, 200_000, D, dtype=torch.float64,
                                                     generator=torch.Generator().manual_seed(1))
    mc = -sch.prior_logp(xT.reshape(-1, D)).reshape(5, -1)
    assert torch.allclose(prior_term(sch, x, sch.t_min), mc.mean(1), atol=5 * float(mc.std(1).max()) / 447)


@pytest.mark.parametrize("schedule", ["vp_linear", "ve"])
def test_importance_weights_integrate_any_function_exactly_in_expectation(schedule):
    """1/p(t) of the importance sampler is the inverse of its density: a fine quadrature of p over [t_min, T]
    is 1, and E[w(t) h(t)] under the sampler equals int h dt."""
    sch = gaussian_model(schedule).schedule
    u = torch.linspace(0, 1, 200_001, dtype=torch.float64)[1:-1]
    t, w = draw_times(sch, u, "importance")
    assert bool((t >= sch.t_min).all() and (t <= sch.T).all())
    h = lambda s: torch.sin(3 * s) + s                                   # noqa: E731
    exact = (-torch.cos(torch.tensor(3 * sch.T)) / 3 + sch.T**2 / 2) - (-math.cos(3 * sch.t_min) / 3
                                                                        + sch.t_min**2 / 2)
    assert float((w * h(t)).mean()) == pytest.approx(float(exact), rel=2e-3)


@pytest.mark.parametrize("t_sampling", ["importance", "uniform"])
def test_monte_carlo_bound_matches_the_gauss_legendre_closed_form_of_a_single_gaussian(t_sampling):
    m = gaussian_model()
    sch = m.schedule
    n = 256
    x, _ = data_points(m, n, 0)
    ref = closed_form_bound(sch, x)
    assert torch.allclose(ref, closed_form_bound(sch, x, 64), atol=1e-9)           # the rule has converged
    prior, integral = sde_bound_terms(Dynamics(m.net, sch).score, sch, x, 0, range(n), 64, t_sampling)
    diff, se = mean_se((prior + integral - ref) / (D * LN2))
    assert abs(diff) < 4 * se and se < 0.03
    # exact score: tight up to the prior mismatch (alpha_T = 0.0066): per point within 1e-4 nats of -log q_t_min
    assert torch.allclose(ref, exact_nll_tmin(m, x), atol=1e-4)


def test_per_point_values_do_not_depend_on_batching_or_on_the_other_points():
    m = gmm()
    x, _ = data_points(m, 6, 0)
    score = Dynamics(m.net, m.schedule).score
    p1, i1 = sde_bound_terms(score, m.schedule, x, 0, range(6), 5, "importance", batch_size=4)
    p2, i2 = sde_bound_terms(score, m.schedule, x[3:], 0, range(3, 6), 5, "importance", batch_size=1000)
    assert torch.allclose(i1[3:], i2, rtol=1e-12) and torch.allclose(p1[3:], p2, rtol=1e-12)


# --------------------------------------------------------------------------------------------- on gmm
@pytest.mark.parametrize("t_sampling", ["importance", "uniform"])
def test_bound_of_the_exact_gmm_score_equals_the_exact_nll_of_x_tmin(tmp_path, t_sampling):
    """(a) bound >= -log q_{t_min}(x) in expectation; with the exact score it is tight, so equal within 4 SEs."""
    m = gmm()
    ctx = make_ctx(m, torch.zeros(2, 4), tmp_path)
    out = make_metric("sde_bound", {"n_points": 512, "n_t": 32, "t_sampling": t_sampling}).compute(ctx)
    assert abs(out["sde_bound_gap"]) < 4 * out["sde_bound_gap_se"] and out["sde_bound_gap_se"] < 0.02
    assert out["sde_bound_gap"] == pytest.approx(out["sde_bound_bpd"] - out["sde_bound_nll_exact"], abs=1e-12)
    x, _ = data_points(m, 512, 0)
    assert out["sde_bound_nll_exact"] == pytest.approx(float(exact_nll_tmin(m, x).mean() / (4 * LN2)), rel=1e-12)


def test_bound_is_above_the_exact_nll_for_a_wrong_score(tmp_path):
    """A model whose eps is scaled by 0.8 is not the exact one: its bound is clearly above -log q_t_min."""
    m = gmm()

    class Scaled(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return 0.8 * self.net(x, t)

    m2 = LoadedModel("gmm_scaled", Scaled(m.net), m.schedule, m.shape, data=m.data)
    out = make_metric("sde_bound", {"n_points": 256, "n_t": 32}).compute(make_ctx(m2, torch.zeros(2, 4), tmp_path))
    assert out["sde_bound_gap"] > 5 * out["sde_bound_gap_se"]


def test_importance_and_uniform_sampling_agree_within_their_errors(tmp_path):
    """(b) the same bound by two proposals: independent estimates, difference within 4 combined SEs."""
    ctx = make_ctx(gmm("vp_cosine"), torch.zeros(2, 4), tmp_path)
    a = make_metric("sde_bound", {"n_points": 256, "n_t": 32, "t_sampling": "importance"}).compute(ctx)
    b = make_metric("sde_bound", {"n_points": 256, "n_t": 32, "t_sampling": "uniform"}).compute(ctx)
    se = math.hypot(a["sde_bound_gap_se"], b["sde_bound_gap_se"])
    assert abs(a["sde_bound_gap"] - b["sde_bound_gap"]) < 4 * se


@pytest.mark.slow
def test_ddpm_elbo_approaches_the_continuous_bound_as_steps_grow(tmp_path):
    """(c) issue 18: the DDPM ELBO (beta variances) falls to the SDE bound as K grows; on gmm with its exact score
    both end at the exact NLL (measured: elbo_gap 0.24 at K = 10, -0.03 +- 0.03 at K = 100 and 1000)."""
    ctx = make_ctx(gmm(), torch.zeros(2, 4), tmp_path)
    sde = make_metric("sde_bound", {"n_points": 1024, "n_t": 64}).compute(ctx)
    e = {K: make_metric("elbo", {"steps": K, "n_points": 1024}).compute(ctx) for K in (10, 1000)}
    d = {K: e[K]["elbo_bpd"] - sde["sde_bound_bpd"] for K in e}
    se = {K: math.hypot(e[K]["elbo_gap_se"], sde["sde_bound_gap_se"]) for K in e}   # paired SEs: same points
    assert d[10] > d[1000] and d[10] > 4 * se[10]
    assert abs(d[1000]) < 0.05 + 3 * se[1000]


# ------------------------------------------------------------------------------------- knobs and the row
@pytest.mark.parametrize("knobs,needle", [
    ({"n_t": 0}, "n_t must be an integer >= 1"),
    ({"n_t": -2}, "n_t must be an integer >= 1"),
    ({"n_t": 2.5}, "n_t must be an integer >= 1"),
    ({"n_t": True}, "n_t must be an integer >= 1"),
    ({"t_sampling": "stratified"}, "Valid values are: importance, uniform"),
    ({"n_points": 1}, "n_points must be an integer >= 2"),
    ({"batch_size": 1}, "batch_size must be an integer >= 2"),
])
def test_bad_knobs_are_config_errors_before_work(knobs, needle):
    before = cache.computed["sde_bound"]
    with pytest.raises(ConfigError, match=needle):
        make_metric("sde_bound", knobs)
    assert cache.computed["sde_bound"] == before


def test_columns_are_declared_with_what_they_are():
    cols, owner = all_columns(), column_owner()
    for name in ("sde_bound_bpd", "sde_bound_bpd_se", "sde_bound_n_t", "sde_bound_n_points", "sde_bound_what"):
        assert owner[name] == "sde_bound"
    c = cols["sde_bound_bpd"]
    assert c.quality and c.se == "sde_bound_bpd_se" and "upper bound" in c.what and "Monte-Carlo" in c.what
    assert not cols["sde_bound_n_t"].quality and not cols["sde_bound_n_points"].quality


from test_faults import run_cli  # noqa: E402  (the command line in this process)


def test_sde_bound_runs_through_the_command_line_once_for_every_solver(tmp_path):
    """(e) end to end on gmm: the columns are written, the protocol says solver none, the second solver reads
    the cached value."""
    common = ["model=gmm", "nfe=4", "n_samples=8", "metrics=[sde_bound]", "metric_cfg.sde_bound.n_t=8",
              "metric_cfg.sde_bound.n_points=64", "progress=false", f"results_dir={tmp_path}"]
    before = cache.computed["sde_bound"]
    for solver in ("euler", "heun"):
        rc, out, err = run_cli("run", f"solver={solver}", *common)
        assert rc == 0, err
        assert "sde_bound_bpd" in out
    assert cache.computed["sde_bound"] == before + 1
    rows = store.load_runs(tmp_path)
    assert len(rows) == 2
    r = rows.iloc[0]
    mets = json.loads(r["metrics"]) if isinstance(r["metrics"], str) else r["metrics"]
    proto = (json.loads(r["protocols"]) if isinstance(r["protocols"], str) else r["protocols"])["sde_bound"]
    assert mets["sde_bound_n_t"] == 8 and mets["sde_bound_n_points"] == 64 and proto["solver"] == "none"
    assert proto["t_sampling"] == "importance" and proto["t_start"] == pytest.approx(1e-3)
    assert abs(mets["sde_bound_gap"]) < 5 * mets["sde_bound_gap_se"]
    assert "upper bound" in mets["sde_bound_what"]
