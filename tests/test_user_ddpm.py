"""A typical DDPM checkpoint from a user's repository, end to end, without workarounds (issue 16).

The test builds the user's repository itself: a small eps-MLP fed a precomputed sinusoidal embedding of the step
index, trained by the repository's own code on sklearn's 8x8 digits in [0, 1] under improved DDPM's cosine betas
with T = 200 steps, saved as a state_dict.  The repository adds one adapter (three lines, with
bench.models.helpers.StepInput) and runs the README's recipe through `model=custom` from its own directory.
"""
import logging
import math
import os
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from bench.models.errors import ConfigError
from bench.models.registry import load_model
from bench.models.schedules import VPDiscrete, make_schedule
from bench.solvers.timesteps import make_timesteps

N = 200
PKG = "ddpm_digits_user"          # the user's package (a unique name: it is imported in this process too)

# --- the user's repository, as they wrote it (their schedule, their embedding helper, their network) ----------
USER_MODEL = '''
import math
import torch
from torch import nn


def cosine_betas(T, s=0.008, max_beta=0.999):
    """improved DDPM's cosine schedule, as the repository computes it."""
    f = [math.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2 for i in range(T + 1)]
    return torch.tensor([min(1 - f[i + 1] / f[i], max_beta) for i in range(T)])


def timestep_embedding(steps, dim):
    """The repository's own helper: DDPM's sinusoidal embedding, computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - 1))
    args = steps.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class Block(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.norm, self.lin1, self.lin2 = nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def forward(self, h, temb):
        return h + self.lin2(nn.functional.silu(self.lin1(nn.functional.silu(self.norm(h))) + temb))


class EpsMLP(nn.Module):
    """eps(x_n, temb): a residual MLP; temb is the precomputed embedding of the step n."""

    def __init__(self, dim=64, emb_dim=32, hidden=192, depth=3):
        super().__init__()
        self.emb = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.skip = nn.Linear(dim, dim)

    def forward(self, x, temb):
        h, e = self.inp(x.flatten(1)), self.emb(temb)
        for b in self.blocks:
            h = b(h, e)
        return (self.out(h) + self.skip(x.flatten(1))).view_as(x)


class EpsMLPOwnEmbedding(EpsMLP):
    """The same network taking the step itself and embedding it with the repository's float32 helper."""

    def forward(self, x, steps):
        return super().forward(x, timestep_embedding(steps, self.emb[0].in_features))


class EpsMLPCastsEmbedding(EpsMLP):
    """... or casting that float32 embedding to the input's dtype: float64 output, float32 resolution in time."""

    def forward(self, x, steps):
        return super().forward(x, timestep_embedding(steps, self.emb[0].in_features).to(x.dtype))
'''

# What the user adds to use the benchmark: a factory of a few lines.
USER_ADAPTER = f'''
from bench.models.helpers import StepInput
from {PKG}.model import EpsMLP, EpsMLPCastsEmbedding, EpsMLPOwnEmbedding


def make_net():
    return StepInput(EpsMLP(), embed_dim=32)          # DDPM's embedding of the step, float64-safe


def make_net_own_embedding():                          # the repository's network as is: fails in float64
    return StepInput(EpsMLPOwnEmbedding())


def make_net_float32_embedding():                      # ... or casting its float32 embedding: silent in float64
    return StepInput(EpsMLPCastsEmbedding())
'''

# The README's recipe (Models, "A DDPM checkpoint from your repository"); the tests add n_samples/results_dir.
RECIPE = [f"model=custom", f"model.factory={PKG}.bench_adapter:make_net", "model.weights=ckpt.pt",
          "model.shape=[1,8,8]", "model.data_range=[0,1]", "model.time_input=step",
          "model.schedule.name=vp_discrete", "model.schedule.betas=cosine", "model.schedule.num_steps=200",
          "metrics=[trunc]"]


def train(model_mod, steps=1500, seed=0):
    """The repository's training loop: DDPM's eps-loss on digits in [0, 1], integer steps n ~ U{0..N-1}."""
    from sklearn.datasets import load_digits

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if steps == 0:
        return model_mod.EpsMLP().eval(), float("nan")
    data = torch.tensor(load_digits().data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    abar = torch.cumprod(1 - model_mod.cosine_betas(N).double(), 0).float()
    net = model_mod.EpsMLP()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x0 = data[torch.randint(0, len(data), (256,), generator=g)]
        n = torch.randint(0, N, (256,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[n].reshape(-1, 1, 1, 1)
        loss = ((net(a.sqrt() * x0 + (1 - a).sqrt() * eps, model_mod.timestep_embedding(n, 32)) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval(), float(loss.detach())


def build_user_repo(root, steps=1500):
    """The user's repository under root: package PKG (model.py, bench_adapter.py) and ckpt.pt, trained for `steps`
    (0 = the initial weights: enough for tests of loading and dtype, and fast)."""
    pkg = root / PKG
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model.py").write_text(textwrap.dedent(USER_MODEL))
    (pkg / "bench_adapter.py").write_text(textwrap.dedent(USER_ADAPTER))
    sys.path.insert(0, str(root))
    import importlib
    model_mod = importlib.import_module(f"{PKG}.model")
    net, loss = train(model_mod, steps)
    torch.save(net.state_dict(), root / "ckpt.pt")
    return model_mod, net, loss


def _repo(tmp_path_factory, steps):
    root = tmp_path_factory.mktemp("user_repo")
    model_mod, net, loss = build_user_repo(root, steps)
    yield root, model_mod, net, loss
    sys.path.remove(str(root))


@pytest.fixture(scope="module")
def user_repo_init(tmp_path_factory):
    """The repository with its network's initial weights (fast)."""
    yield from _repo(tmp_path_factory, 0)


@pytest.fixture(scope="module")
def user_repo(tmp_path_factory):
    """The repository with a trained checkpoint (about 20 s on one core)."""
    yield from _repo(tmp_path_factory, 1500)


def _cfg(root, *extra, **values):
    import bench.api
    return bench.api.config(*RECIPE, f"model.weights={root / 'ckpt.pt'}", "n_samples=32", "batch_size=32",
                            "progress=false", *extra, **values)


@pytest.fixture(autouse=True, scope="module")
def _float32_default():
    """A user's network is built in torch's default dtype, float32 (bench.orders.main sets float64 process-wide)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(before)


# --- 1. model configs that compose -------------------------------------------------------------------------

CALLS = []


class ZeroEps(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


def record_kwargs(**kwargs):
    """A factory that records what reaches it."""
    CALLS.append(kwargs)
    return ZeroEps()


def test_command_line_model_starts_clean():
    """The README's recipe without `~` removals: no key of another model's example reaches the factory or schedule."""
    import bench.api

    CALLS.clear()
    cfg = bench.api.config("model=custom", f"model.factory={__name__}:record_kwargs", "model.shape=[3]",
                           "model.time_input=step", "model.schedule.name=vp_discrete",
                           "model.schedule.betas=cosine", "model.schedule.num_steps=200")
    m = load_model(cfg["model"])
    assert CALLS == [{}] and cfg["model"]["weights"] is None
    assert isinstance(m.schedule, VPDiscrete) and m.schedule.N == 200 and m.schedule.t_min == 1 / 200
    CALLS.clear()
    load_model(bench.api.config("model=custom", f"model.factory={__name__}:record_kwargs", "model.shape=[3]",
                                "model.kwargs={in_features:3}", "model.schedule.name=edm")["model"])
    assert CALLS == [{"in_features": 3}]          # edm takes neither T nor t_min: null keys are its defaults


def test_own_yaml_on_the_searchpath_starts_clean(tmp_path):
    import bench.api

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_ddpm.yaml").write_text(textwrap.dedent(f"""
        name: custom
        factory: {__name__}:record_kwargs
        shape: [3]
        time_input: step
        schedule: {{name: vp_discrete, betas: scaled_linear, num_steps: 50}}
    """))
    CALLS.clear()
    cfg = bench.api.config(model="my_ddpm", searchpath=tmp_path)
    m = load_model(cfg["model"])
    assert CALLS == [{}] and m.schedule.N == 50 and "beta_min" not in cfg["model"]["schedule"]


def test_wrong_keys_are_named_with_what_is_accepted():
    import bench.api

    with pytest.raises(ConfigError, match=r"'vp_discrete' has no parameter 'beta_min' \(= beta_min=0.1\)\. It "
                                          r"accepts: betas, num_steps, beta_start, beta_end, s, max_beta, T, t_min"):
        load_model(bench.api.config("model=custom", f"model.factory={__name__}:record_kwargs", "model.shape=[3]",
                                    "model.schedule.name=vp_discrete", "model.schedule.beta_min=0.1")["model"])
    with pytest.raises(ConfigError, match=r"does not take the keyword arguments \{'depth': 4\} \(model.kwargs\)"):
        load_model(bench.api.config("model=custom", f"model.factory={__name__}:record_kwargs", "model.shape=[3]",
                                    "model.kwargs={depth:4}")["model"] | {"factory": "torch.nn:Tanh"})
    with pytest.raises(ConfigError, match="factory needs an import path"):
        load_model(bench.api.config("model=custom", "model.shape=[3]")["model"])


# --- 2. discrete schedules by name, list or file ------------------------------------------------------------

def _alpha_bar(sch):
    return (sch.alpha(sch.t_n) ** 2).numpy()


def test_named_schedules_match_the_published_formulas():
    # DDPM (Ho et al. 2020): linear 1e-4 .. 0.02
    b = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(make_schedule("vp_discrete", betas="linear").betas.numpy(), b, rtol=1e-12)
    np.testing.assert_allclose(_alpha_bar(make_schedule("vp_discrete", betas="linear")), np.cumprod(1 - b), rtol=1e-9)
    # improved DDPM (Nichol & Dhariwal 2021, eq. 17): alpha_bar(t) = f(t)/f(0), f = cos^2((t/T + s)/(1 + s) pi/2),
    # beta_t = min(1 - alpha_bar(t)/alpha_bar(t-1), 0.999), s = 0.008
    f = [math.cos((i / N + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(N + 1)]
    b = np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(N)])
    cos = make_schedule("vp_discrete", betas="cosine", num_steps=N)
    np.testing.assert_allclose(cos.betas.numpy(), b, rtol=1e-10)
    assert cos.betas[-1] == 0.999 and cos.betas[-2] < 0.999          # only the last beta is clipped at N = 200
    np.testing.assert_allclose(_alpha_bar(cos)[:-1], np.array(f[1:N]) / f[0], rtol=1e-9)
    b4 = b.copy()
    b4[-1] = 0.9999
    np.testing.assert_allclose(make_schedule("vp_discrete", betas="cosine", num_steps=N, max_beta=0.9999).betas.numpy(),
                               b4, rtol=1e-10)
    # Stable Diffusion: scaled_linear = linspace(sqrt(0.00085), sqrt(0.012), N)^2
    b = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    np.testing.assert_allclose(make_schedule("vp_discrete", betas="scaled_linear").betas.numpy(), b, rtol=1e-12)
    # the measurements of issue 16: sigma_hat(T) of the cosine schedule with T = 200 steps
    sh = lambda s: float(s.sigma_hat(s.T))  # noqa: E731
    assert sh(make_schedule("vp_discrete", betas="cosine", num_steps=N, max_beta=0.9999)) == pytest.approx(12833, rel=1e-3)
    assert sh(cos) == pytest.approx(4058, rel=1e-3)


def test_betas_as_list_and_files(tmp_path):
    b = make_schedule("vp_discrete", betas="cosine", num_steps=N).betas
    np.save(tmp_path / "b.npy", b.numpy())
    torch.save(b, tmp_path / "b.pt")
    (tmp_path / "b.txt").write_text("\n".join(f"{v:.17g}" for v in b.tolist()))
    for betas in (b.tolist(), str(tmp_path / "b.npy"), str(tmp_path / "b.pt"), str(tmp_path / "b.txt")):
        s = make_schedule("vp_discrete", betas=betas)
        assert s.N == N and s.t_min == 1 / N and torch.equal(s.betas, b), betas


@pytest.mark.parametrize("kw,needle", [
    ({"betas": "cosinus"}, "neither a schedule name \\(linear, cosine, scaled_linear\\) nor a file ending in .npy"),
    ({"betas": "missing.npy"}, "betas file .*missing.npy' does not exist"),
    ({"betas": [0.1, 0.2], "num_steps": 3}, "num_steps=3 but the betas have 2 entries"),
    ({"betas": [0.1, 1.5]}, "betas must lie in \\(0, 1\\)"),
    ({"betas": "cosine", "num_steps": 1}, "num_steps must be an integer >= 2"),
    ({"betas": "cosine", "beta_start": 0.001}, "'cosine' takes s and max_beta, not beta_start/beta_end"),
    ({"betas": "cosine", "num_steps": N, "t_min": 0.001}, "t_min=0.001 lies below the first discrete step 1/N = 0.005"),
    ({"betas": "cosine", "num_steps": N, "T": 1.2}, "T=1.2 lies beyond the last discrete step t_N = 1"),
    ({"betas": "cosine", "num_steps": N, "max_beta": 1.5}, "0 < max_beta <= 1"),
])
def test_bad_discrete_schedules_are_config_errors(kw, needle, tmp_path):
    if kw["betas"] == "missing.npy":
        kw = {**kw, "betas": str(tmp_path / "missing.npy")}
    with pytest.raises(ConfigError, match=needle):
        make_schedule("vp_discrete", **kw)


# --- 3. divergence means divergence ---------------------------------------------------------------------------

def test_a_nan_grid_is_a_config_error_naming_the_value():
    """The issue's case: t_min = 0.001 below the first of 200 steps makes alpha > 1 and the grid NaN; built past
    the schedule's own check, the grid check still stops it before any sampling."""
    sch = VPDiscrete(betas="cosine", num_steps=N, t_min=0.001)        # no check_schedule: as a loader might
    with pytest.raises(ConfigError, match=r"timesteps 'edm': the model's sigma_hat at t_min = 0.001 is nan"):
        make_timesteps("edm", sch, 5)
    with pytest.raises(ConfigError, match=r"time-step schedule 'uniform_t' .*: sigma\(t\[4\] = 0.001\) = nan is not"):
        make_timesteps("uniform_t", sch, 5)


def test_a_non_finite_prior_scale_is_a_config_error():
    from bench.models.schedules import VPLinear, check_schedule

    class Broken(VPLinear):
        def prior_std(self):
            return float("inf")

    with pytest.raises(ConfigError, match=r"the prior scale sigma\(T\) = inf at T=1.0 is not a finite positive"):
        check_schedule(Broken())


def test_config_errors_record_nothing_and_nan_samples_are_diverged(tmp_path, monkeypatch):
    import bench.api
    from bench import store
    from bench.solvers import timesteps as ts

    res = tmp_path / "res"
    base = ["model=custom", f"model.factory={__name__}:record_kwargs", "model.shape=[2]", "model.schedule.name=vp_discrete",
            "model.schedule.betas=cosine", "model.schedule.num_steps=200", "n_samples=4", "batch_size=4",
            "progress=false", "metrics=[]", f"results_dir={res}", "solver=euler", "nfe=4"]
    with pytest.raises(ConfigError, match="t_min=0.001 lies below the first discrete step"):
        bench.api.run_cell(**bench.api.config(*base, "model.schedule.t_min=0.001"))
    monkeypatch.setitem(ts.TIMESTEPS, "uniform_t", lambda schedule, n: torch.full((n,), float("nan"), dtype=torch.float64))
    with pytest.raises(ConfigError, match=r"non-finite time t\[1\] = nan"):
        from bench.run import run
        run(bench.api.config(*base, "timesteps=uniform_t"))
    assert store.load_runs(res).empty
    monkeypatch.undo()
    # non-finite samples on a finite grid stay a divergence, recorded as such
    from bench.run import run
    row = run(bench.api.config(*base, f"model.factory={__name__}:make_blowup"))
    assert row["status"] == "diverged" and row["n_diverged"] == 4


class BlowUp(torch.nn.Module):
    """eps that overflows at low noise: a genuinely unstable model on a valid grid."""

    def forward(self, x, t):
        return x * torch.where(t.reshape(-1, 1) < 0.1, torch.tensor(float("inf")), torch.tensor(1.0))


def make_blowup():
    return BlowUp()


# --- 4. grids that respect the model ------------------------------------------------------------------------

def _edm_formula(hi, lo, n, rho=7.0):
    r = np.linspace(0, 1, n)
    return (hi ** (1 / rho) + r * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def test_edm_grid_is_capped_as_edm_vp_where_the_model_saturates():
    cos = make_schedule("vp_discrete", betas="cosine", num_steps=N)
    lo = float(cos.sigma_hat(cos.t_min))
    t = make_timesteps("edm", cos, 10)
    np.testing.assert_allclose(cos.sigma_hat(t).numpy(), _edm_formula(80.0, lo, 10), rtol=1e-9)
    t = make_timesteps("edm", cos, 10, sigma_max=None)                   # uncapped: the model's 4058
    np.testing.assert_allclose(cos.sigma_hat(t).numpy(), _edm_formula(float(cos.sigma_hat(1.0)), lo, 10), rtol=1e-9)
    # vp_linear (sigma_hat(T) = 152 < 10 x 80): today's grid, unchanged; cap_factor=1 caps it as EDM does
    vp = make_schedule("vp_linear")
    hi, lo = float(vp.sigma_hat(1.0)), float(vp.sigma_hat(vp.t_min))
    t = make_timesteps("edm", vp, 6)
    assert t[0] == 1.0 and t[-1] == vp.t_min
    np.testing.assert_allclose(vp.sigma_hat(t).numpy(), _edm_formula(hi, lo, 6), rtol=1e-9)
    np.testing.assert_allclose(vp.sigma_hat(make_timesteps("edm", vp, 6, cap_factor=1.0)).numpy(),
                               _edm_formula(80.0, lo, 6), rtol=1e-9)
    # the floor: a schedule reaching sigma_hat < 0.002 / 10 ends at EDM's 0.002
    fine = make_schedule("vp_linear", t_min=1e-7)
    assert float(fine.sigma_hat(make_timesteps("edm", fine, 6)[-1])) == pytest.approx(0.002, rel=1e-9)
    for bad, needle in (({"sigma_max": -1}, "sigma_max must be a positive number or null"),
                        ({"cap_factor": 0.5}, "cap_factor must be a number >= 1"),
                        ({"sigma_min": 100.0, "sigma_max": 80.0}, "need sigma_min < sigma_max")):
        with pytest.raises(ConfigError, match=needle):
            make_timesteps("edm", cos, 10, **bad)


def test_logsnr_grid_is_capped_too_and_shipped_grids_are_unchanged():
    cos = make_schedule("vp_discrete", betas="cosine", num_steps=N)
    lam = lambda s, t: s.lambda_(t).numpy()  # noqa: E731
    t = make_timesteps("logsnr", cos, 10)
    np.testing.assert_allclose(lam(cos, t), np.linspace(-math.log(80.0), float(cos.lambda_(cos.t_min)), 10), rtol=1e-9)
    t = make_timesteps("logsnr", cos, 10, sigma_max=None)
    np.testing.assert_allclose(lam(cos, t), np.linspace(float(cos.lambda_(1.0)), float(cos.lambda_(cos.t_min)), 10),
                               rtol=1e-9)
    # the shipped models' schedules (sigma_hat(T) = 152 for vp_linear, 157 for DDPM's linear 1000 steps): the grids
    # of the edm and logsnr presets are bit for bit today's formulas
    for sch in (make_schedule("vp_linear"), make_schedule("vp_discrete"), make_schedule("vp_cosine")):
        for n in (2, 6, 19):
            hi, lo = float(sch.sigma_hat(sch.T)), float(sch.sigma_hat(sch.t_min))
            r = torch.linspace(0, 1, n, dtype=torch.float64)
            edm = sch.t_of_sigma_hat((hi ** (1 / 7) + r * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7)
            logsnr = sch.t_of_lambda(torch.linspace(float(sch.lambda_(sch.T)), float(sch.lambda_(sch.t_min)), n,
                                                    dtype=torch.float64))
            for ref in (edm, logsnr):
                ref[0], ref[-1] = sch.T, sch.t_min
            assert torch.equal(make_timesteps("edm", sch, n), edm) and torch.equal(make_timesteps("logsnr", sch, n), logsnr)


def test_saturated_grid_warns(caplog):
    cos = make_schedule("vp_discrete", betas="cosine", num_steps=N, max_beta=0.9999)
    with caplog.at_level(logging.WARNING, logger="timesteps"):
        make_timesteps("edm", cos, 5, sigma_max=None)
    assert "3 of its 5 points lie at sigma_hat > 80, where the schedule is saturated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="timesteps"):
        make_timesteps("edm", cos, 5)
        make_timesteps("edm", make_schedule("vp_linear"), 5)
    assert "saturated" not in caplog.text


# --- 5. helpers a user's factory needs ------------------------------------------------------------------------

def test_sinusoidal_embedding_is_float64_safe_and_ddpms():
    from bench.models.helpers import sinusoidal_embedding

    n = torch.tensor([0.0, 1.0, 57.25, 199.0], dtype=torch.float64)
    e = sinusoidal_embedding(n, 32)
    assert e.dtype == torch.float64
    w = [10000 ** (-k / 15) for k in range(16)]                         # DDPM: log(10000)/(half - 1)
    ref = [[math.sin(v * wk) for wk in w] + [math.cos(v * wk) for wk in w] for v in n.tolist()]
    np.testing.assert_allclose(e.numpy(), np.array(ref), rtol=0, atol=1e-14)
    g = sinusoidal_embedding(n, 33, freq_shift=0, cos_first=True)       # guided-diffusion's variant, odd dim
    w = [10000 ** (-k / 16) for k in range(16)]
    assert g.shape == (4, 33) and float(g[2, 0]) == pytest.approx(math.cos(57.25), abs=1e-14) and g[:, -1].eq(0).all()
    assert float(g[2, 17]) == pytest.approx(math.sin(57.25 * w[1]), abs=1e-14)
    assert sinusoidal_embedding(torch.tensor([3, 4]), 8).dtype == torch.float32    # integer steps: default dtype


def test_step_input_loads_the_users_weights_and_matches_their_net(user_repo_init):
    root, mod, net, _ = user_repo_init
    from bench.models.helpers import sinusoidal_embedding

    steps = torch.arange(N)
    assert torch.allclose(sinusoidal_embedding(steps.double(), 32).float(), mod.timestep_embedding(steps, 32), atol=3e-5)
    m = load_model(_cfg(root)["model"])
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for n in (0, 17, 120, N - 1):
        t = torch.full((4,), (n + 1) / N)
        with torch.no_grad():
            ref = net(x, mod.timestep_embedding(torch.full((4,), n), 32))
        assert torch.allclose(m.net(x, t), ref, atol=1e-5), n
    assert m.net(x.double(), torch.full((4,), 0.3, dtype=torch.float64)).dtype == torch.float64


def test_float64_check_before_any_work(user_repo_init, tmp_path, caplog):
    from bench.run import plan, run

    root = user_repo_init[0]
    res = tmp_path / "res"
    own = _cfg(root, f"results_dir={res}", f"model.factory={PKG}.bench_adapter:make_net_own_embedding", "solver=euler",
               "nfe=5")
    with pytest.raises(ConfigError, match=r"model=custom: the network fails on float64 input \(RuntimeError: .*\)\. "
                                          r"A float64 reference \(metric trunc"):
        run(own)
    from bench import store
    assert store.load_runs(res).empty
    plan({**own, "metrics": []})                                        # float32 without trunc: nothing to check
    with caplog.at_level(logging.WARNING, logger="models"):
        plan(_cfg(root, f"model.factory={PKG}.bench_adapter:make_net_float32_embedding", "solver=euler", "nfe=5"))
    assert "does not change when t changes below float32 resolution" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models"):
        plan(_cfg(root, "solver=euler", "nfe=5"))
    assert "float32" not in caplog.text


def make_float32_out():
    class F32(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t):
            return (x * self.w).float()
    return F32()


def test_float32_output_is_an_error(tmp_path):
    from bench.run import plan

    cfg = _cfg(tmp_path, f"model.factory={__name__}:make_float32_out", "model.weights=null", "solver=euler", "nfe=5")
    with pytest.raises(ConfigError, match="the network returns torch.float32 for float64 input"):
        plan(cfg)


# --- 6. the recipe, in process and as the README runs it ------------------------------------------------------

@pytest.mark.slow
def test_recipe_in_process_capped_grid_recorded(user_repo, tmp_path):
    """The recipe through the Python API: trunc on the default (capped) EDM grid, the range in the row; Heun on
    the uncapped grid spends its points at sigma_hat ~ 4000 and is far worse (the issue's pure-noise Heun)."""
    from bench.run import run

    res = tmp_path / "res"
    rows = {cap: run(_cfg(user_repo[0], f"results_dir={res}", "solver=heun", "nfe=10", "timesteps=edm",
                          *(["timesteps.sigma_max=null"] if cap == "none" else [])))
            for cap in ("default", "none")}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    capped = rows["default"]["config"]["timesteps"]
    assert capped["sigma_hat_range"][0] == 80.0 and capped["model_sigma_hat_range"][0] == pytest.approx(4058, rel=1e-3)
    assert rows["none"]["config"]["timesteps"]["sigma_hat_range"][0] == pytest.approx(4058, rel=1e-3)
    e_cap, e_none = (rows[k]["metrics"]["trunc_rms"] for k in ("default", "none"))
    assert e_none > 3 * e_cap, (e_cap, e_none)


def _bench(cwd, *args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_readme_recipe_and_a_multirun_from_the_users_directory(user_repo):
    root = user_repo[0]
    res = root / "results"
    extra = ["n_samples=64", f"results_dir={res}", "progress=false"]
    r = _bench(root, "run", *RECIPE, "solver=heun", "nfe=10", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trunc_rms" in r.stdout and "Traceback" not in r.stderr
    r = _bench(root, "run", "-m", *RECIPE, "solver=euler,heun,dpm_solver_pp", "nfe=10", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    con = sqlite3.connect(res / "results.sqlite")
    rows = con.execute("SELECT solver, status, nfe, json_extract(metrics, '$.trunc_rms'), "
                       "json_extract(config, '$.timesteps.sigma_hat_range') FROM runs ORDER BY id").fetchall()
    con.close()
    assert [(s, st) for s, st, *_ in rows] == [("heun", "ok"), ("euler", "ok"), ("dpm_solver_pp", "ok")], rows
    assert all(0 < e < 1 for *_, e, _ in rows), rows
    assert rows[0][2] == 9 and rows[1][2] == 10 and rows[2][2] == 10
    assert all(r[4].startswith("[80.0,") for r in rows), rows   # heun, euler on edm, dpm_solver_pp on logsnr: capped
