"""Conditional models and classifier-free guidance (issue 10, item 3): the guided eps of the class-conditional
GMM against closed forms computed independently, NFE and network-forward counts, per-index labels, the label
accuracy metric, bad knobs as ConfigErrors that record nothing, and the shipped conditional digits network."""
import math
from pathlib import Path

import pytest
import torch

from bench import guidance
from bench.models.dynamics import Guided
from bench.models.errors import ConfigError
from bench.models.registry import load_model

GMM_COND = {"name": "gmm", "conditional": True, "schedule": {"name": "vp_linear"}}


@pytest.fixture(scope="module")
def cgmm():
    return load_model(GMM_COND)


def eps_closed_form(gmm, x, alpha, sigma, label=None):
    """eps* = -sigma grad log q_t from full covariances C_k = alpha^2 S_k + sigma^2 I (no eigen-form, no shared
    code with models/gmm.py): of component `label`, or of the whole mixture (label None)."""
    d = gmm.dim
    C = alpha**2 * gmm.covs + sigma**2 * torch.eye(d, dtype=torch.float64)          # (K, d, d)
    diff = x[:, None, :] - alpha * gmm.means[None]                                   # (B, K, d)
    g = torch.linalg.solve(C[None], diff.unsqueeze(-1)).squeeze(-1)                  # C_k^{-1}(x - alpha mu_k)
    if label is not None:
        return sigma * g[:, label]
    mvn = torch.distributions.MultivariateNormal(alpha * gmm.means, covariance_matrix=C)
    logw = mvn.log_prob(x[:, None, :]) + torch.log(gmm.weights)[None]
    r = torch.softmax(logw, dim=1)
    return sigma * (r[..., None] * g).sum(1)


@pytest.mark.parametrize("s", [0.0, 1.0, 3.0, 7.5])
def test_guided_eps_is_the_closed_form_combination(cgmm, s):
    gmm, sch = cgmm.data, cgmm.schedule
    gen = torch.Generator().manual_seed(1)
    n = 12
    x = torch.randn(n, gmm.dim, dtype=torch.float64, generator=gen) * 1.5
    t = torch.full((n,), 0.3, dtype=torch.float64)
    alpha, sigma = float(sch.alpha(t[0])), float(sch.sigma(t[0]))
    labels = torch.arange(n) % gmm.K
    g = Guided(cgmm.net, labels, s, torch.full_like(labels, cgmm.null_label))
    out = g(x, t)
    e_u = eps_closed_form(gmm, x, alpha, sigma)
    e_c = torch.stack([eps_closed_form(gmm, x[i:i + 1], alpha, sigma, int(labels[i]))[0] for i in range(n)])
    want = (1 - s) * e_u + s * e_c
    assert torch.allclose(out, want, rtol=0, atol=1e-12), float((out - want).abs().max())
    if s == 1.0:   # plain conditional: the component's exact eps
        assert torch.allclose(out, e_c, rtol=0, atol=1e-12)
    assert g.forwards == (1 if s in (0.0, 1.0) else 2)


class CountingNet:
    """Counts network calls and the rows they process."""

    def __init__(self, net):
        self.net, self.calls, self.rows = net, 0, 0

    def __call__(self, x, t, cond=None):
        self.calls += 1
        self.rows += x.shape[0]
        return self.net(x, t, cond)


@pytest.mark.parametrize("s,per_eval", [(1.0, 1), (0.0, 1), (3.0, 2)])
def test_one_guided_evaluation_is_one_nfe_and_two_forwards(cgmm, s, per_eval):
    from bench.run import generate
    from bench.solvers.registry import solver_from_cfg
    from bench.solvers.timesteps import make_timesteps

    spec, knobs = solver_from_cfg({"name": "dpm_solver_pp"})
    t = make_timesteps(spec.default_timesteps, cgmm.schedule, spec.steps_for(10, **knobs))
    counting = CountingNet(cgmm.net)
    model = guidance.dataclasses.replace(cgmm, net=counting)
    cond = guidance.Conditioning(cgmm.n_classes, cgmm.null_label, s)
    n = 6
    _, _, nfes, _ = generate(model, spec, knobs, t, n, n, 0, torch.device("cpu"), torch.float64, cond=cond)
    assert nfes == [10]
    assert cond.forwards == [10 * per_eval]
    assert counting.calls == 10                          # cond and uncond batched into one network call
    assert counting.rows == 10 * per_eval * n


def test_labels_depend_only_on_the_sample_index(cgmm):
    c = guidance.Conditioning(3, 3, 1.0, "cycle")
    assert c.labels_of([0, 1, 2, 3, 7]).tolist() == [0, 1, 2, 0, 1]
    assert guidance.Conditioning(3, 3, 1.0, 2).labels_of([0, 5]).tolist() == [2, 2]
    assert guidance.Conditioning(3, 3, 1.0, [2, 0]).labels_of([0, 1, 2, 3]).tolist() == [2, 0, 2, 0]
    from bench.run import generate
    from bench.solvers.registry import solver_from_cfg
    from bench.solvers.timesteps import make_timesteps

    spec, knobs = solver_from_cfg({"name": "heun"})
    t = make_timesteps(spec.default_timesteps, cgmm.schedule, spec.steps_for(8, **knobs))
    outs = []
    for bs in (1, 7, 64):
        cond = guidance.Conditioning(cgmm.n_classes, cgmm.null_label, 3.0)
        outs.append(generate(cgmm, spec, knobs, t, 64, bs, 0, torch.device("cpu"), torch.float64, cond=cond)[1])
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-12) and torch.allclose(outs[0], outs[2], rtol=0, atol=1e-12)
    # and a different label changes the sample: the condition really reaches the network
    cond = guidance.Conditioning(cgmm.n_classes, cgmm.null_label, 3.0, [1, 2, 0])
    other = generate(cgmm, spec, knobs, t, 3, 3, 0, torch.device("cpu"), torch.float64, cond=cond)[1]
    assert (other - outs[0][:3]).abs().max() > 0.1


@pytest.mark.slow
def test_conditional_samples_have_the_component_moments(cgmm):
    """s = 1, every sample asks for class k: the sampler's output matches N(mu_k, S_k) (mean within 4 standard
    errors per coordinate, covariance entries within 4 standard errors of the Gaussian sampling variance)."""
    from bench.run import generate
    from bench.solvers.registry import solver_from_cfg
    from bench.solvers.timesteps import make_timesteps

    gmm, n = cgmm.data, 4000
    spec, knobs = solver_from_cfg({"name": "dpm_solver_pp"})
    t = make_timesteps(spec.default_timesteps, cgmm.schedule, spec.steps_for(40, **knobs))
    for k in range(gmm.K):
        cond = guidance.Conditioning(cgmm.n_classes, cgmm.null_label, 1.0, k)
        x = generate(cgmm, spec, knobs, t, n, n, 7, torch.device("cpu"), torch.float64, cond=cond)[1]
        mu, S = gmm.means[k], gmm.covs[k]
        se_mu = torch.sqrt(torch.diagonal(S) / n)
        assert ((x.mean(0) - mu).abs() < 4 * se_mu).all(), (k, x.mean(0) - mu, se_mu)
        xc = x - x.mean(0)
        S_hat = xc.T @ xc / (n - 1)
        se_S = torch.sqrt((S**2 + torch.outer(torch.diagonal(S), torch.diagonal(S))) / n)   # Wishart variance
        assert ((S_hat - S).abs() < 4 * se_S).all(), (k, (S_hat - S) / se_S)


def _mc_accuracy(gmm, n, seed):
    """P(argmax_j p(j | x) = y) for y uniform over classes, by Monte Carlo with scipy's densities (independent
    of models/gmm.py's closed forms), and its binomial standard error."""
    import numpy as np
    from scipy.stats import multivariate_normal

    rs = np.random.default_rng(seed)
    y = np.repeat(np.arange(gmm.K), n // gmm.K)
    x = np.concatenate([rs.multivariate_normal(gmm.means[k].numpy(), gmm.covs[k].numpy(), n // gmm.K)
                        for k in range(gmm.K)])
    n = len(y)
    logp = np.stack([multivariate_normal(gmm.means[k].numpy(), gmm.covs[k].numpy()).logpdf(x)
                     for k in range(gmm.K)], 1) + np.log(gmm.weights.numpy())
    p = float((logp.argmax(1) == y).mean())
    return p, math.sqrt(p * (1 - p) / n)


def test_label_accuracy_of_exact_samples_matches_monte_carlo():
    from bench.metrics import MetricContext
    from bench.metrics.label_acc import LabelAccuracy

    model = load_model({**GMM_COND, "dim": 2, "mean_scale": 0.6, "seed": 3})   # overlapping components
    gmm, n = model.data, 3000
    y = torch.arange(n) % gmm.K
    x = gmm.sample_class(y, torch.Generator().manual_seed(0))
    ctx = MetricContext(cfg={"metrics": ["label_acc"], "labels": None}, model=model, spec=None, knobs={}, t=None,
                        x_T=None, samples=x, device=torch.device("cpu"), dtype=torch.float64, batch_size=500)
    out = LabelAccuracy().compute(ctx)
    p_mc, se_mc = _mc_accuracy(gmm, 60000, 1)
    assert 0.5 < p_mc < 0.95                        # a case where the classifier is neither perfect nor chance
    assert abs(out["label_acc"] - p_mc) < 4 * math.hypot(out["label_acc_se"], se_mc), (out, p_mc)
    assert out["label_acc_se"] == pytest.approx(math.sqrt(out["label_acc"] * (1 - out["label_acc"]) / n))
    # the same samples judged against wrong labels (each asks for the next class): low accuracy
    ctx_wrong = MetricContext(cfg={"metrics": ["label_acc"], "labels": [1, 2, 0]}, model=model, spec=None,
                              knobs={}, t=None, x_T=None, samples=x, device=torch.device("cpu"),
                              dtype=torch.float64, batch_size=500)
    wrong = LabelAccuracy().compute(ctx_wrong)
    assert wrong["label_acc"] < 0.5 * p_mc


def test_identity_changes_only_off_the_defaults():
    assert guidance.identity({}) == {} and guidance.identity({"guidance_scale": 1, "labels": "cycle"}) == {}
    assert guidance.identity({"guidance_scale": 3}) == {"guidance": {"guidance_scale": 3.0, "labels": "cycle"}}
    with pytest.raises(ConfigError, match="guidance_scale"):
        guidance.identity({"guidance_scale": "big"})
    with pytest.raises(ConfigError, match="labels"):
        guidance.identity({"labels": [1, "a"]})


@pytest.mark.slow
def test_bad_guidance_knobs_are_config_errors_that_record_nothing(tmp_path):
    from tests.test_faults import n_rows, run_cli

    base = ["n_samples=8", "metrics=[]", "progress=false", f"results_dir={tmp_path}"]
    cases = [(["model=gmm", "guidance_scale=3"], "is unconditional"),
             (["model=gmm", "labels=1"], "is unconditional"),
             (["model=gmm", "model.conditional=true", "labels=3"], "out of range"),
             (["model=gmm", "model.conditional=true", "labels=[0,-1]"], "out of range"),
             (["model=gmm", "model.conditional=true", "guidance_scale=-1"], "guidance_scale must be"),
             (["model=gmm", "model.conditional=true", "metrics=[nll]"], "cannot score"),
             (["model=gmm", "metrics=[label_acc]"], "label_acc scores conditional")]
    for over, msg in cases:
        rc, out, err = run_cli("run", *base, *over)
        assert rc != 0 and msg in err, (over, err)
        assert n_rows(tmp_path) == 0, over


def test_unet_null_label_is_the_unconditional_branch():
    from bench.models.unet import UNet

    torch.manual_seed(0)
    net = UNet(1, 8, (1, 2), 32, n_classes=4).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.4)
    with torch.no_grad():
        a, b = net(x, t), net(x, t, torch.full((3,), 4))
        c = net(x, t, torch.tensor([0, 1, 2]))
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-4
    with pytest.raises(ValueError):
        UNet(1, 8, (1, 2), 32)(x, t, torch.zeros(3, dtype=torch.long))


def test_label_dropout_rate():
    from bench.models.train import drop_labels

    y = torch.zeros(100000, dtype=torch.long)
    d = drop_labels(y, 0.15, 10, torch.Generator().manual_seed(0))
    frac = float((d == 10).double().mean())
    assert abs(frac - 0.15) < 4 * math.sqrt(0.15 * 0.85 / len(y)) and set(d.unique().tolist()) == {0, 10}


WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights" / "digits_cond_unet.pt"


@pytest.mark.slow
@pytest.mark.skipif(not WEIGHTS.exists(), reason="train with python -m bench.models.train digits_cond")
def test_shipped_conditional_digits_follow_their_labels(tmp_path):
    """The shipped network at s = 3 (DPM-Solver++ 2M, 10 NFE): the classifier finds the requested digit in
    most samples, far above the 10 % of unconditional samples (s = 0)."""
    import bench.api

    rows = {s: bench.api.run_cell(model="digits_cond", solver="dpm_solver_pp", nfe=10, guidance_scale=s,
                                  metrics=["label_acc"], n_samples=200, results_dir=str(tmp_path), progress=False)
            for s in (0.0, 3.0)}
    acc = {s: r["metrics"]["label_acc"] for s, r in rows.items()}
    assert acc[3.0] > 0.9 and acc[0.0] < 0.3, acc
    assert rows[3.0]["nfe"] == 10 and rows[3.0]["nfe_forwards"] == 20 and rows[0.0]["nfe_forwards"] == 10


def test_api_sample_takes_labels_and_guidance():
    """bench.sample passes labels and guidance_scale through to the guided sampler (not unconditional samples)."""
    from bench.api import sample

    m = {"name": "gmm", "conditional": True, "schedule": {"name": "vp_linear"}}
    for k in (0, 1, 2):
        r = sample(model=m, solver="heun", nfe=39, n_samples=32, dtype="float64", labels=k, guidance_scale=1.0)
        post = r.model.data.posterior(r.x0)                           # exact class posterior of the data
        assert float((post.argmax(1) == k).double().mean()) > 0.8
