"""Classifier guidance (issue 18 item 2): score + s grad_x log p_t(y | x) in the dynamics, from the exact GMM class
posterior, a user's log-potential by import path, or a noise-aware classifier.

The exact identity: on the GMM, classifier guidance with the exact posterior at scale s is classifier-free guidance
with the exact conditional at scale s (eps_u + s (eps_c - eps_u) = eps_u - s sigma grad log p_t(y | x), since
grad log p_t(y | x) = grad log q_t(x | y) - grad log q_t(x)), checked through whole sampling runs in float64."""
import math
import sys
import textwrap

import pytest
import torch

from bench import api, guidance
from bench.models.classifier import ExactPosterior
from bench.models.dynamics import ClassifierGuided
from bench.models.errors import ConfigError
from bench.models.registry import load_model

GMM = {"name": "gmm", "schedule": {"name": "vp_linear"}}


@pytest.fixture(scope="module")
def ugmm():
    return load_model(GMM)


def _closed_form_grad(gmm, x, alpha, sigma, y):
    """grad_x log p_t(y | x) from full covariances C_k = alpha^2 S_k + sigma^2 I (no eigen-form, no autograd):
    -C_y^{-1}(x - alpha mu_y) + sum_k r_k C_k^{-1}(x - alpha mu_k)."""
    C = alpha**2 * gmm.covs + sigma**2 * torch.eye(gmm.dim, dtype=torch.float64)
    diff = x[:, None, :] - alpha * gmm.means[None]
    g = torch.linalg.solve(C[None], diff.unsqueeze(-1)).squeeze(-1)                    # (B, K, d)
    mvn = torch.distributions.MultivariateNormal(alpha * gmm.means, covariance_matrix=C)
    r = torch.softmax(mvn.log_prob(x[:, None, :]) + torch.log(gmm.weights)[None], dim=1)
    return -g[torch.arange(len(y)), y] + (r[..., None] * g).sum(1)


@pytest.mark.parametrize("t", [0.01, 0.3, 0.9])
def test_exact_posterior_gradient_is_the_closed_form(ugmm, t):
    gmm, sch = ugmm.data, ugmm.schedule
    x = torch.randn(9, gmm.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    y = torch.arange(9) % gmm.K
    tt = torch.full((9,), t, dtype=torch.float64)
    cg = ClassifierGuided(lambda x, t: torch.zeros_like(x), ExactPosterior(gmm, sch), y, 1.0, sch)
    want = _closed_form_grad(gmm, x, float(sch.alpha(tt[0])), float(sch.sigma(tt[0])), y)
    assert torch.allclose(cg.grad_log_potential(x, tt), want, rtol=1e-10, atol=1e-12)
    # probabilities: exp(log p_t(y | x)) summed over y is 1
    lp = torch.stack([ExactPosterior(gmm, sch)(x, tt, torch.full((9,), k)) for k in range(gmm.K)], 1)
    assert torch.allclose(lp.exp().sum(1), torch.ones(9, dtype=torch.float64), atol=1e-13)


@pytest.mark.parametrize("solver,knobs", [("heun", {}), ("dpm_solver_pp", {"order": 3}),
                                          pytest.param("unipc", {"order": 2}, marks=pytest.mark.slow),
                                          ("euler_maruyama", {}),
                                          pytest.param("ancestral", {}, marks=pytest.mark.slow)])
@pytest.mark.parametrize("s", [0.0, 1.0, 2.5, 7.5])
def test_classifier_guidance_with_the_exact_posterior_is_cfg_with_the_exact_conditional(solver, knobs, s):
    """Whole sampling runs, float64, same x_T and noise: CG(s) on the unconditional mixture = CFG(s) on the
    class-conditional mixture, to 1e-10 (issue 18's identity)."""
    common = dict(solver=solver, nfe=12, n_samples=12, dtype="float64", **knobs)
    cg = api.sample(model=GMM, classifier_scale=s, **common)
    cfg = api.sample(model={**GMM, "conditional": True}, guidance_scale=s, **common)
    assert torch.equal(cg.x_T, cfg.x_T) and cg.nfe == cfg.nfe
    err = (cg.x0 - cfg.x0).abs().max().item()
    assert err < 1e-10, err
    if s not in (0.0, 1.0):          # and guidance really moved the samples
        plain = api.sample(model={**GMM, "conditional": True}, **common)
        assert (plain.x0 - cfg.x0).abs().max().item() > 1e-2


def test_guided_samples_at_scale_one_are_exact_conditional_samples(ugmm):
    """s = 1 with the exact posterior samples q(x | y): label accuracy (exact Bayes judge) of the ODE samples equals
    that of exact class-conditional draws within standard errors; s = 0 ignores the labels (near chance)."""
    model = load_model({**GMM, "dim": 2, "mean_scale": 0.6, "seed": 3})      # overlapping components
    gmm, n = model.data, 1500
    y = torch.arange(n) % gmm.K
    exact = gmm.sample_class(y, torch.Generator().manual_seed(5))
    p_exact = float((gmm.posterior(exact).argmax(1) == y).double().mean())
    cfg_model = {**GMM, "dim": 2, "mean_scale": 0.6, "seed": 3}
    accs = {}
    for s in (0.0, 1.0, 4.0):
        r = api.sample(model=cfg_model, solver="dpm_solver_pp", order=3, nfe=20, n_samples=n, dtype="float64",
                       classifier_scale=s)
        accs[s] = float((gmm.posterior(r.x0).argmax(1) == y).double().mean())
    se = math.sqrt(p_exact * (1 - p_exact) / n) * math.sqrt(2)
    assert 0.5 < p_exact < 0.95
    assert abs(accs[1.0] - p_exact) < 4 * se, (accs, p_exact)
    assert accs[0.0] < p_exact - 8 * se            # unguided: the labels do not matter
    assert accs[4.0] > accs[1.0] + 4 * se          # stronger guidance: samples follow their labels more


def test_counts_classifier_evaluations_in_their_own_column(tmp_path):
    base = {"n_samples": 8, "metrics": [], "results_dir": str(tmp_path), "solver": "heun", "nfe": 10}
    rows = {s: api.run_cell(model="gmm", classifier_scale=s, **base) for s in (0.0, 2.0)}
    plain = api.run_cell(model="gmm", **base)
    assert rows[2.0]["nfe"] == rows[0.0]["nfe"] == plain["nfe"]                  # NFE counts the network only
    assert rows[2.0]["classifier_evals"] == rows[2.0]["nfe"] and rows[0.0]["classifier_evals"] == 0
    assert rows[2.0]["classifier"] == "exact_posterior" and rows[2.0]["classifier_scale"] == 2.0
    assert "classifier_scale" not in plain and plain.get("classifier_evals") is None
    assert len({rows[0.0]["key"], rows[2.0]["key"], plain["key"]}) == 3
    from bench import store
    from bench.report import newest_per_cell
    labels = sorted(newest_per_cell(store.load_runs(tmp_path))["label"])      # each scale its own report line
    assert len(labels) == 3 and sum("cg=2" in v for v in labels) == 1 and sum("cg=0" in v for v in labels) == 1


def test_identity_has_the_classifier_only_when_guided():
    assert guidance.identity({"model": {"name": "gmm"}}) == {}
    g = guidance.identity({"model": {"name": "gmm"}, "classifier_scale": 2})["guidance"]
    assert g == {"guidance_scale": 1.0, "labels": "cycle", "classifier_scale": 2.0, "classifier": "exact_posterior"}
    g = guidance.identity({"model": {"name": "digits", "guidance_classifier": "w.pt"}, "classifier_scale": 1,
                           "classifier": "pkg.m:lp"})["guidance"]
    assert g["classifier"] == "pkg.m:lp"
    from bench.run import MODEL_NEUTRAL, _without_neutral
    assert "guidance_classifier" not in _without_neutral({"name": "digits", "guidance_classifier": "w.pt"},
                                                          MODEL_NEUTRAL)


USER_MODULE = '''
import torch

class GMMLogits:
    """The GMM's class posterior as logits from per-component log densities (torch.distributions), not ExactPosterior."""
    def __init__(self):
        from bench.models.registry import load_model
        m = load_model({"name": "gmm", "schedule": {"name": "vp_linear"}})
        self.gmm, self.sch, self.n_classes = m.data, m.schedule, m.data.K

    def __call__(self, x, t, y):
        a = self.sch.alpha(t.double()).to(x.dtype).reshape(-1, 1, 1, 1)
        s = self.sch.sigma(t.double()).to(x.dtype).reshape(-1, 1, 1, 1)
        C = a**2 * self.gmm.covs[None] + s**2 * torch.eye(self.gmm.dim, dtype=x.dtype)          # (B, K, d, d)
        mvn = torch.distributions.MultivariateNormal(a[..., 0] * self.gmm.means[None], covariance_matrix=C)
        return mvn.log_prob(x[:, None, :]) + torch.log(self.gmm.weights)[None]

def energy(x, t, y):
    return -0.5 * (x ** 2).sum(1)          # a label-free log-potential: pulls samples towards 0

def wrong_shape(x, t, y):
    return x[:, :, None]
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_guides.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_guides"
    sys.modules.pop("my_guides", None)


def test_a_users_classifier_by_import_path(user_module):
    common = dict(model=GMM, solver="heun", nfe=10, n_samples=9, dtype="float64", classifier_scale=3.0)
    own = api.sample(**common)
    user = api.sample(classifier=f"{user_module}:GMMLogits", **common)
    assert (own.x0 - user.x0).abs().max().item() < 1e-10
    # a label-free energy E = |x|^2 / 2: its guided eps is eps - s sigma grad(-E) = eps + s sigma x (closed form),
    # and the samples shrink (stiff at large s: Heun with few steps is unstable there, as for any stiff drift)
    m = load_model(GMM)
    cond = guidance.conditioning({"classifier_scale": 0.7, "classifier": f"{user_module}:energy"}, m)
    assert cond.labels_of(range(4)) is None and cond.n_classes is None
    x, t = torch.randn(4, 4, dtype=torch.float64), torch.full((4,), 0.4, dtype=torch.float64)
    got = cond.wrap(m.net, range(4))(x, t)
    assert torch.allclose(got, m.net(x, t) + 0.7 * m.schedule.sigma(t)[:, None] * x, rtol=1e-13, atol=1e-13)
    plain = api.sample(model=GMM, solver="heun", nfe=20, n_samples=9, dtype="float64")
    e = api.sample(**{**common, "nfe": 20, "classifier_scale": 0.3}, classifier=f"{user_module}:energy")
    assert e.x0.norm() < 0.9 * plain.x0.norm()
    with pytest.raises(ConfigError, match="returned shape"):
        api.sample(classifier=f"{user_module}:wrong_shape", **common)
    with pytest.raises(ConfigError, match="label-free"):
        api.sample(classifier=f"{user_module}:energy", labels=1, **common)
    with pytest.raises(ConfigError, match="cannot import module"):
        api.sample(classifier="no_such_pkg.mod:lp", **common)


def test_bad_classifier_knobs_are_errors_before_any_work(ugmm):
    toy = load_model({"name": "toy2d", **{k: v for k, v in api.config(model="toy2d")["model"].items()
                                          if k != "name"}})
    cases = [({"classifier_scale": -1}, ugmm, "classifier_scale must be"),
             ({"classifier_scale": float("nan")}, ugmm, "classifier_scale must be"),
             ({"classifier_scale": True}, ugmm, "classifier_scale must be"),
             ({"classifier": "a.b:c"}, ugmm, "classifier_scale is null"),
             ({"classifier_scale": 1, "guidance_scale": 2}, ugmm, "is unconditional"),
             ({"classifier_scale": 1, "labels": 3}, ugmm, "out of range"),
             ({"classifier_scale": 1}, toy, "has no classifier for guidance"),
             ({"classifier_scale": 1, "metrics": ["nll"]}, ugmm, "cannot score"),
             ({"classifier_scale": 1, "metrics": ["fid"]}, ugmm, "metric fid")]
    for cfg, model, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            guidance.conditioning(cfg, model)
    # the classes of a user's classifier must match a conditional model's
    class Four:
        n_classes, name = 4, "four"
    cm = load_model({**GMM, "conditional": True})
    from dataclasses import replace
    with pytest.raises(ConfigError, match="has 4 classes"):
        guidance.conditioning({"classifier_scale": 1}, replace(cm, guidance_classifier=Four()))


@pytest.mark.slow
def test_bad_classifier_knobs_record_nothing(tmp_path):
    from tests.test_faults import n_rows, run_cli

    base = ["n_samples=8", "metrics=[]", "progress=false", f"results_dir={tmp_path}"]
    for over, msg in [(["model=gmm", "classifier_scale=-1"], "classifier_scale must be"),
                      (["model=toy2d", "classifier_scale=1"], "has no classifier for guidance")]:
        rc, out, err = run_cli("run", *base, *over)
        assert rc != 0 and msg in err, (over, err)
        assert n_rows(tmp_path) == 0, over


def test_sharded_runs_record_counted_forwards_and_classifier_evals(tmp_path, monkeypatch):
    """A sharded cell records the forwards and classifier evaluations its shards counted, not NFE x the per-NFE
    figure: with that figure made wrong on purpose, the recorded counts stay the counted ones (2 forwards per guided
    NFE, one classifier gradient per NFE), and equal those of the same cell unsharded."""
    from bench import guidance

    base = {"n_samples": 8, "batch_size": 3, "metrics": [], "results_dir": str(tmp_path), "solver": "heun", "nfe": 10,
            "model": {"name": "gmm", "conditional": True}, "guidance_scale": 2.0, "classifier_scale": 1.0}
    plain = api.run_cell(**base)
    monkeypatch.setattr(guidance.Conditioning, "forwards_per_eval", property(lambda self: 99))
    monkeypatch.setattr(guidance.Conditioning, "classifier_evals_per_eval", property(lambda self: 99))
    sharded = api.run_cell(**{**base, "num_shards": 3, "results_dir": str(tmp_path / "sharded")})
    assert sharded["status"] == plain["status"] == "ok"
    assert sharded["nfe"] == plain["nfe"] == 9
    assert sharded["nfe_forwards"] == plain["nfe_forwards"] == 18
    assert sharded["classifier_evals"] == plain["classifier_evals"] == 9
