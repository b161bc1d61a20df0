"""Parametrizations (issue 10, item 1): a network may predict eps, x0, v, score or velocity; models/dynamics.py converts
it to eps in one place (to_eps, EpsNet), so every solver runs unchanged on every parametrization.

The exact GMM exposes its prediction in each form in closed form from the mixture (models/gmm.py exact_prediction:
x0 by Tweedie's posterior mean, score directly, v and velocity from those), not through to_eps, so the identity test
compares two independent paths: every registered deterministic solver gives the same samples (float64, 1e-10)."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from bench.models.dynamics import PARAMETRIZATIONS, Dynamics, EpsNet, to_eps
from bench.models.errors import ConfigError
from bench.models.registry import load_model
from bench.models.schedules import make_schedule
from bench.solvers.registry import SOLVERS, get_solver
from bench.solvers.rng import PerSampleRNG
from bench.solvers.timesteps import make_timesteps

from test_faults import n_rows, run_cli

get_solver("euler")                                            # registers the built-ins
DETERMINISTIC = sorted(n for n, s in SOLVERS.items() if not s.stochastic)
TOL = 1e-10
SCHEDULES = ("vp_linear", "flow")



def _close(a, b, rtol=1e-12, atol=1e-12):
    """allclose with the largest difference in the message (torch.testing.assert_close costs 1.3 s to import)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b).to(torch.as_tensor(a).dtype)
    assert torch.allclose(a, b, rtol=rtol, atol=atol), float((a - b).abs().max())

def _gmm(p, schedule="vp_linear"):
    return load_model({"name": "gmm", "parametrization": p, "schedule": {"name": schedule}})


def _knobs(name):
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "conf" / "solver" / f"{name}.yaml"
    return {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "name"} if path.exists() else {}


def _sample(model, name, n=8, steps=6):
    spec = get_solver(name)
    if spec.batch_coupled:                                     # adaptive (dopri5): the grid's length is its NFE cap
        steps = 400
    t = make_timesteps(spec.default_timesteps, model.schedule, max(steps, spec.min_steps))
    x_T = PerSampleRNG(0, range(n), dtype=torch.float64).randn(model.shape) * model.schedule.prior_std()
    dyn = Dynamics(model.net, model.schedule)
    with torch.inference_mode():
        return spec.fn(dyn, x_T, t, PerSampleRNG(1, range(n), dtype=torch.float64), **_knobs(name)), dyn.nfe


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "diffusers" else n  # imports diffusers
                                  for n in DETERMINISTIC])
def test_every_parametrization_gives_the_same_samples(name, schedule):
    if name == "diffusers" and schedule == "flow":
        with pytest.raises(ConfigError):          # diffusers' schedulers assume a VP schedule (solvers/diffusers_sched)
            _sample(_gmm("eps", schedule), name)
        return
    ref, nfe = _sample(_gmm("eps", schedule), name)
    assert torch.isfinite(ref).all()
    diffs = {}
    for p in PARAMETRIZATIONS[1:]:
        x, nfe_p = _sample(_gmm(p, schedule), name)
        diffs[p] = float((x - ref).abs().max())
        assert nfe_p == nfe
    print(f"\n{schedule} {name}: " + json.dumps({p: f"{d:.1e}" for p, d in diffs.items()}))
    assert max(diffs.values()) <= TOL, diffs


def test_the_exact_predictions_are_not_the_same_numbers():
    """The identity above is not vacuous: the raw outputs differ between parametrizations."""
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.full((5,), 0.4, dtype=torch.float64)
    raw = {p: _gmm(p).raw_net(x, t) for p in PARAMETRIZATIONS}
    for i, p in enumerate(PARAMETRIZATIONS):
        for q in PARAMETRIZATIONS[i + 1:]:
            assert (raw[p] - raw[q]).abs().max() > 1e-2, (p, q)


@pytest.mark.parametrize("schedule", ["vp_linear", "vp_cosine", "ve", "edm", "sub_vp", "flow"])
def test_to_eps_closed_forms(schedule):
    """Outputs built from (x0, eps) by each definition convert back to eps: x = alpha x0 + sigma eps,
    v = alpha eps - sigma x0, score = -eps/sigma, velocity = alpha' x0 + sigma' eps (alpha', sigma' by finite
    differences of alpha(t), sigma(t), independent of the schedule's d_alpha/d_sigma)."""
    s = make_schedule(schedule)
    g = torch.Generator().manual_seed(1)
    t = torch.linspace(s.t_min, s.T, 7, dtype=torch.float64)[1:-1]
    if schedule == "flow":
        t = torch.cat([t, torch.tensor([1.0], dtype=torch.float64)])   # alpha = 0: velocity's robust form is finite
    x0, eps = torch.randn(len(t), 3, dtype=torch.float64, generator=g), torch.randn(len(t), 3, dtype=torch.float64, generator=g)
    a, sg = s.alpha(t)[:, None], s.sigma(t)[:, None]
    x = a * x0 + sg * eps
    h = 1e-6 * t
    tp, tm = torch.minimum(t + h, torch.ones_like(t)) if schedule == "flow" else t + h, t - h
    da = ((s.alpha(tp) - s.alpha(tm)) / (tp - tm))[:, None]
    ds = ((s.sigma(tp) - s.sigma(tm)) / (tp - tm))[:, None]
    outs = {"eps": eps, "x0": x0, "v": a * eps - sg * x0, "score": -eps / sg, "velocity": da * x0 + ds * eps}
    assert set(outs) == set(PARAMETRIZATIONS)
    for p, out in outs.items():
        if p == "x0" and schedule == "flow":
            got = to_eps(out[:-1], x[:-1], t[:-1], s, p)      # x0 and x do not determine eps where alpha = 0 ... sigma = 1:
            want = eps[:-1]                                   # they do (eps = x); checked on t < 1
        else:
            got, want = to_eps(out, x, t, s, p), eps
        tol = 1e-6 if p == "velocity" else 1e-12             # finite-difference derivatives
        assert torch.allclose(got, want, rtol=tol, atol=tol * 10), (p, (got - want).abs().max())
    assert to_eps(eps, x, t, s, "eps") is eps                 # eps: the raw output itself, no arithmetic


def test_velocity_is_the_probability_flow_ode():
    """u = alpha' x0 + sigma' eps is the ODE's right-hand side f x + g^2/(2 sigma) eps (Song et al. 2021, eq. 13)."""
    for name in ("vp_linear", "ve", "sub_vp", "flow"):
        s = make_schedule(name)
        m = _gmm("velocity", name)
        x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        t = torch.linspace(s.t_min, s.T, 6, dtype=torch.float64)
        u = m.raw_net(x, t)
        rhs = Dynamics(_gmm("eps", name).net, s).ode_rhs(t, x)
        assert torch.allclose(u, rhs, rtol=1e-9, atol=1e-9), (name, (u - rhs).abs().max())


def test_eps_net_passes_the_raw_output_and_the_condition():
    calls = []

    def raw(x, t, cond=None):
        calls.append(cond)
        return x * 2.0
    s = make_schedule("vp_linear")
    net = EpsNet(raw, s, "eps")
    x, t = torch.randn(3, 2), torch.full((3,), 0.5)
    out = net(x, t)
    assert torch.equal(out, x * 2.0) and calls == [None]
    net(x, t, torch.tensor([1, 2, 3]))
    assert calls[-1].tolist() == [1, 2, 3]
    x0net = EpsNet(raw, s, "x0")
    _close(x0net(x, t), (x - s.alpha(0.5).float() * 2 * x) / s.sigma(0.5).float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown parametrization 'foo'"):
        EpsNet(raw, s, "foo")


def test_loaded_model_keeps_the_raw_network_and_its_weights():
    m = _gmm("x0")
    assert isinstance(m.net, EpsNet) and m.parametrization == "x0" and m.net.raw_net is m.raw_net
    toy = load_model({"name": "toy2d", "weights": "models/weights/toy2d_mlp.pt",
                      "schedule": {"name": "vp_linear", "beta_min": 0.1, "beta_max": 20.0}})
    assert toy.parametrization == "eps"
    assert list(toy.net.state_dict()) == list(toy.raw_net.state_dict())    # weight fingerprints unchanged
    assert [p.data_ptr() for p in toy.net.parameters()] == [p.data_ptr() for p in toy.raw_net.parameters()]
    x, t = torch.randn(4, 2), torch.full((4,), 0.3)
    assert torch.equal(toy.net(x, t), toy.raw_net(x, t))                  # eps: bitwise the network's output


class _GMMPrediction(torch.nn.Module):
    """A user's network predicting the exact GMM's x0 (or another parametrization), for model=custom."""

    def __init__(self, parametrization="x0"):
        super().__init__()
        from bench.models.gmm import GaussianMixture
        self.gmm, self.schedule, self.p = GaussianMixture.random(4, 3, 0), make_schedule("vp_linear"), parametrization

    def forward(self, x, t):
        from bench.models.gmm import exact_prediction
        return exact_prediction(self.gmm, self.schedule, x, t, self.p)


def make_gmm_prediction(parametrization="x0"):
    return _GMMPrediction(parametrization)


@pytest.mark.parametrize("p", ["x0", "velocity"])
def test_custom_model_declares_its_parametrization(p):
    """model=custom with parametrization: a user's x0- (velocity-) network of the exact GMM samples as the gmm eps model."""
    m = load_model({"name": "custom", "factory": f"{__name__}:make_gmm_prediction", "kwargs": {"parametrization": p},
                    "shape": [4], "parametrization": p, "schedule": {"name": "vp_linear"}})
    assert m.parametrization == p
    x, _ = _sample(m, "dpm_solver_pp")
    ref, _ = _sample(_gmm("eps"), "dpm_solver_pp")
    assert float((x - ref).abs().max()) <= TOL
    wrong = load_model({"name": "custom", "factory": f"{__name__}:make_gmm_prediction", "kwargs": {"parametrization": p},
                        "shape": [4], "schedule": {"name": "vp_linear"}})            # declared eps: other samples
    assert float((_sample(wrong, "dpm_solver_pp")[0] - ref).abs().max()) > 1e-2


def test_a_declaration_the_loader_contradicts_is_an_error():
    with pytest.raises(ConfigError, match="declares parametrization 'v'.*predicts 'eps'"):
        load_model({"name": "toy2d", "parametrization": "v", "weights": "models/weights/toy2d_mlp.pt",
                    "schedule": {"name": "vp_linear", "beta_min": 0.1, "beta_max": 20.0}})


def test_unknown_parametrization_is_a_clear_error_recording_nothing(tmp_path):
    rc, out, err = run_cli("run", "model=gmm", "model.parametrization=foo", "n_samples=4", "metrics=[]",
                           "progress=false", f"results_dir={tmp_path}")
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert "unknown parametrization 'foo'" in err and "eps, x0, v, score, velocity" in err, err
    assert n_rows(tmp_path) == 0


# --- hf_ddpm: the scheduler config's prediction_type ----------------------------------------------------------------

def _tiny_hf(tmp_path, prediction_type):
    from test_hf_ddpm import _tiny
    root, unet, sched = _tiny(tmp_path / prediction_type, "flat")
    cfg = json.loads((root / "scheduler_config.json").read_text())
    cfg["prediction_type"] = prediction_type
    (root / "scheduler_config.json").write_text(json.dumps(cfg))
    return root, unet.double(), cfg


@pytest.mark.slow
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_hf_ddpm_prediction_type_matches_diffusers_ddim(tmp_path, prediction_type):
    """Our DDIM (solver=diffusers, which hands diffusers eps from our dynamics) on the checkpoint loaded with its
    prediction_type equals diffusers' own DDIMScheduler configured with that prediction_type stepping on the raw
    UNet output: diffusers' conversion of v / x0 and ours agree.  Tolerance: diffusers keeps alphas_cumprod in float32
    in its own loop (ours are float64), about 1e-7 relative per step."""
    diffusers = pytest.importorskip("diffusers")
    root, unet, cfg = _tiny_hf(tmp_path, prediction_type)
    model = load_model({"name": "hf_ddpm", "path": str(root)})
    assert model.parametrization == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[prediction_type]
    steps, n = 6, 3
    x_T = torch.randn(n, *model.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    spec = get_solver("diffusers")
    t = make_timesteps("uniform_t", model.schedule, steps)
    with torch.inference_mode():
        ours = spec.fn(Dynamics(model.net, model.schedule), x_T, t, None, scheduler="DDIMScheduler")
    ref_sched = diffusers.DDIMScheduler(num_train_timesteps=cfg["num_train_timesteps"], beta_schedule=cfg["beta_schedule"],
                                        prediction_type=prediction_type, clip_sample=False)
    ref_sched.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for tau in ref_sched.timesteps:
            out = unet(x, torch.full((n,), int(tau))).sample
            x = ref_sched.step(out, tau, x).prev_sample
    err = float((ours - x).abs().max())
    print(f"\nhf_ddpm {prediction_type}: max |ours - diffusers DDIM| = {err:.2e}")
    assert err <= 1e-4 * float(x.abs().max()), err


@pytest.mark.slow
def test_hf_ddpm_unknown_prediction_type_is_an_error(tmp_path):
    root, _, _ = _tiny_hf(tmp_path, "flow_prediction")
    with pytest.raises(ConfigError, match="prediction_type 'flow_prediction'; supported are epsilon, v_prediction, sample"):
        load_model({"name": "hf_ddpm", "path": str(root)})
