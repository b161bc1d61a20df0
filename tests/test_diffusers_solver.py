"""solver=diffusers: diffusers schedulers on our exact gmm model, against our own solvers on the same time grid.

Parity setup: gmm on vp_discrete (DDPM's linear betas 1e-4..0.02, N = 1000, so the scheduler's betas are our
schedule's), float64, 64 samples; our solver runs on t = (timesteps + 1)/N, the scheduler's own time steps.
Where a convention differs, the test asserts the difference at its measured size and the setting that removes it.
"""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from bench.models.dynamics import Dynamics  # noqa: E402
from bench.models.errors import ConfigError  # noqa: E402
from bench.models.registry import load_model  # noqa: E402
from bench.solvers import diffusers_sched as ds  # noqa: E402
from bench.solvers.registry import get_solver, solver_from_cfg  # noqa: E402
from bench.solvers.rng import PerSampleRNG, TorchGeneratorRNG  # noqa: E402

# diffusers' schedulers call numpy on torch tensors (numpy 2 deprecation warnings, thousands per KDPM2 run)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROUNDOFF = 1e-12     # float64 tables, no float32 step: agreement to round-off
CAST32 = 5e-6        # DPMSolverMultistep / Euler cast the state to float32 inside step (measured <= 1.5e-6)


@pytest.fixture(scope="module")
def disc():
    m = load_model({"name": "gmm", "schedule": {"name": "vp_discrete"}})
    # x_T from the per-sample torch generators: the float32-cast tolerances below were measured on this draw (with the
    # counter-based stream's seed 0 the Euler cast difference is 1.0e-5 rather than 1.1e-6: they scale with x_T)
    x_T = TorchGeneratorRNG(0, range(64), dtype=torch.float64).randn(m.shape) * m.schedule.prior_std()
    return m, x_T


def run_diffusers(m, x_T, steps, scheduler, config=None, rng=None, **knobs):
    dyn = Dynamics(m.net, m.schedule)
    t = torch.linspace(m.schedule.T, m.schedule.t_min, steps, dtype=torch.float64)   # only its length is used
    x = get_solver("diffusers").fn(dyn, x_T, t, rng, scheduler=scheduler, config=config, **knobs)
    return x, dyn.nfe


def scheduler_grid(m, steps, scheduler, config=None):
    """Our time grid for the scheduler's time steps: t = (tau + 1)/N (Heun: each repeated timestep once)."""
    cls = ds._scheduler_class(scheduler)
    sched = ds._build(cls, ds._check_config(cls, config), m.schedule.N)
    sched.set_timesteps(steps)
    tau = sched.timesteps.double()
    if scheduler == "HeunDiscreteScheduler":
        tau = torch.cat([tau[:1], tau[1::2]])
    return (tau + 1) / m.schedule.N


def run_ours(m, x_T, name, t, **knobs):
    return get_solver(name).fn(Dynamics(m.net, m.schedule), x_T, t, None, **knobs)


def diff(m, x_T, steps, scheduler, config, ours, knobs):
    a = run_ours(m, x_T, ours, scheduler_grid(m, steps, scheduler, config), **knobs)
    b, _ = run_diffusers(m, x_T, steps, scheduler, config)
    return float((a - b).abs().max())


# --- parity: same algorithm, same grid -------------------------------------------------------------------------
PAIRS = [   # scheduler, config, our solver, its knobs, tolerance (measured max abs difference in the comment)
    ("DDIMScheduler", {"set_alpha_to_one": True}, "euler", {}, ROUNDOFF),                        # 6e-15
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
     "dpm_solver_pp", {"order": 2}, CAST32),                                                     # 1.2e-6
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, "dpm_solver_pp", {"order": 3, "d2": "dpm_solver_code"},
     CAST32),                                                                                    # 1.4e-6
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, "euler", {}, CAST32),          # 1.1e-6
    ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}, "unipc", {"order": 2, "variant": "bh2"},
     ROUNDOFF),                                                                                  # 4e-15
    ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh2"}, "unipc", {"order": 3, "variant": "bh2"},
     ROUNDOFF),                                                                                  # 3e-15
    ("HeunDiscreteScheduler", {"timestep_spacing": "trailing"}, "heun", {}, ROUNDOFF),          # 3e-15
]


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("scheduler,config,ours,knobs,tol", PAIRS, ids=[f"{p[0]}-{p[2]}{p[3]}" for p in PAIRS])
def test_parity_with_our_solver(disc, steps, scheduler, config, ours, knobs, tol):
    m, x_T = disc
    assert diff(m, x_T, steps, scheduler, config, ours, knobs) <= tol


def test_dpm_solver_final_step_defaults(disc):
    """diffusers' DPMSolverMultistep defaults final_sigmas_type='zero', lower_order_final=True, euler_at_final=False:
    its last step (first order to sigma = 0) is our x0-prediction.  With zero final sigma, lower_order_final=False and
    euler_at_final=True change nothing; final_sigmas_type='sigma_min' stops at t = 1/N without denoising."""
    m, x_T = disc
    base = {"algorithm_type": "dpmsolver++", "solver_order": 2}
    for extra in ({"lower_order_final": False}, {"euler_at_final": True}, {"final_sigmas_type": "zero"}):
        assert diff(m, x_T, 10, "DPMSolverMultistepScheduler", {**base, **extra}, "dpm_solver_pp", {"order": 2}) <= CAST32
    d = diff(m, x_T, 10, "DPMSolverMultistepScheduler", {**base, "final_sigmas_type": "sigma_min"}, "dpm_solver_pp",
             {"order": 2})
    assert 5e-3 < d < 5e-2                                                   # measured 1.5e-2


def test_dpm_solver_3m_second_difference_convention(disc):
    """3M: diffusers weights D2 as the DPM-Solver code does (our default d2=dpm_solver_code); d2=taylor differs
    by a truncation-size amount.  lower_order_final agrees below and above 15 steps."""
    m, x_T = disc
    assert 2e-2 < diff(m, x_T, 10, "DPMSolverMultistepScheduler", {"solver_order": 3}, "dpm_solver_pp",
                       {"order": 3, "d2": "taylor"}) < 0.2                   # measured 7.7e-2
    assert diff(m, x_T, 10, "DPMSolverMultistepScheduler", {"solver_order": 3}, "dpm_solver_pp", {"order": 3}) <= CAST32
    for steps in (10, 20):
        assert diff(m, x_T, steps, "DPMSolverMultistepScheduler", {"solver_order": 3, "lower_order_final": False},
                    "dpm_solver_pp", {"order": 3, "d2": "dpm_solver_code", "lower_order_final": False}) <= CAST32


def test_euler_fractional_timesteps(disc):
    """EulerDiscrete's default timestep_spacing='linspace' gives fractional timesteps for most step counts (all
    integers for 10 steps).  There diffusers interpolates sigma linearly between nodes while our schedule interpolates
    log alpha, and the network gets t = (tau + 1)/N: the samples differ by ~7e-6 (20 steps); integer timesteps
    ('trailing' or 'leading') remove it down to the float32 state cast.  Heun (no cast) shows the same: 1.9e-5 with
    'linspace', round-off with 'trailing'."""
    m, x_T = disc
    assert diff(m, x_T, 10, "EulerDiscreteScheduler", {}, "euler", {}) <= CAST32
    d = diff(m, x_T, 20, "EulerDiscreteScheduler", {}, "euler", {})
    assert 2e-6 < d < 1e-5                                                   # measured 6.8e-6
    for spacing in ("trailing", "leading"):
        assert diff(m, x_T, 20, "EulerDiscreteScheduler", {"timestep_spacing": spacing}, "euler", {}) <= CAST32
    d = diff(m, x_T, 20, "HeunDiscreteScheduler", {}, "heun", {})
    assert 5e-6 < d < 1e-4                                                   # measured 1.9e-5
    assert diff(m, x_T, 20, "HeunDiscreteScheduler", {"timestep_spacing": "trailing"}, "heun", {}) <= ROUNDOFF


def test_ddim_conventions(disc):
    """DDIM steps from tau to tau - N//steps, the next timestep only with 'leading' spacing (its default; 'trailing'
    when steps divides N): 'linspace' evaluates at one time and steps from another.  set_alpha_to_one=False ends at
    t = 1/N without denoising."""
    m, x_T = disc
    for spacing in ("leading", "trailing"):
        assert diff(m, x_T, 10, "DDIMScheduler", {"timestep_spacing": spacing}, "euler", {}) <= ROUNDOFF
    assert diff(m, x_T, 10, "DDIMScheduler", {"timestep_spacing": "linspace"}, "euler", {}) > 0.1   # measured 0.36
    d = diff(m, x_T, 10, "DDIMScheduler", {"set_alpha_to_one": False}, "euler", {})
    assert 1e-4 < d < 2e-3                                                   # measured 4.5e-4


def test_float64_tables_matter(disc, monkeypatch):
    """With diffusers' float32 alphas_cumprod/sigmas, DDIM and UniPC agree with ours only to ~1e-6."""
    m, x_T = disc
    monkeypatch.setattr(ds, "_float64_tables", lambda sched, acp: None)
    assert 1e-8 < diff(m, x_T, 10, "DDIMScheduler", {}, "euler", {}) < 1e-5                    # measured 1.1e-6
    assert 1e-8 < diff(m, x_T, 10, "UniPCMultistepScheduler", {}, "unipc", {}) < 1e-5          # measured 5.5e-7


@pytest.mark.parametrize("schedule", ["vp_linear", "vp_cosine"])
def test_continuous_schedules(schedule):
    """A continuous VP schedule is sampled at t_n = (n+1) T/N with N = num_train_timesteps; DDIM is still our Euler."""
    m = load_model({"name": "gmm", "schedule": {"name": schedule}})
    x_T = PerSampleRNG(0, range(16), dtype=torch.float64).randn(m.shape) * m.schedule.prior_std()
    b, nfe = run_diffusers(m, x_T, 10, "DDIMScheduler")
    cls = ds._scheduler_class("DDIMScheduler")
    sched = ds._build(cls, ds._check_config(cls, None), 1000)
    sched.set_timesteps(10)
    a = run_ours(m, x_T, "euler", (sched.timesteps.double() + 1) * m.schedule.T / 1000)
    assert nfe == 10 and float((a - b).abs().max()) <= ROUNDOFF
    x32, _ = run_diffusers(m, x_T.float(), 10, "DPMSolverMultistepScheduler")
    b64, _ = run_diffusers(m, x_T, 10, "DPMSolverMultistepScheduler")
    assert x32.dtype == torch.float32 and float((x32.double() - b64).abs().max()) < 1e-4


# --- NFE -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler,steps,nfe", [("DDIMScheduler", 10, 10), ("DPMSolverMultistepScheduler", 7, 7),
                                                 ("HeunDiscreteScheduler", 10, 19), ("KDPM2DiscreteScheduler", 4, 7),
                                                 ("PNDMScheduler", 10, 19), ("UniPCMultistepScheduler", 3, 3)])
def test_counted_nfe_is_declared(disc, scheduler, steps, nfe):
    m, x_T = disc
    spec = get_solver("diffusers")
    assert spec.nfe_of_steps(steps, scheduler=scheduler) == nfe
    assert run_diffusers(m, x_T[:4], steps, scheduler)[1] == nfe


def test_budget_to_steps():
    spec = get_solver("diffusers")
    assert spec.steps_for(10, scheduler="HeunDiscreteScheduler") == 5             # 2*5 - 1 = 9 <= 10
    assert spec.steps_for(13, scheduler="PNDMScheduler") == 4                     # PNDM takes >= 4 steps: 13 NFE
    with pytest.raises(ConfigError, match="at least 13"):
        spec.steps_for(12, scheduler="PNDMScheduler")
    with pytest.raises(ConfigError, match="at least 3"):
        spec.steps_for(2)
    assert spec.steps_for(5000) == 1000                                           # at most N steps
    assert spec.steps_for(200, scheduler="LCMScheduler") == 50                    # LCM: original_inference_steps


# --- through the benchmark -------------------------------------------------------------------------------------
def test_run_cell(tmp_path):
    from bench.api import run_cell

    row = run_cell(model="gmm", solver={"name": "diffusers", "scheduler": "DPMSolverMultistepScheduler"}, nfe=10,
                   n_samples=16, metrics=["trunc"], metric_cfg={"trunc": {"profile": True}},
                   results_dir=str(tmp_path), progress=False)
    assert row["status"] == "ok" and row["nfe"] == 10 and row["steps"] == 10
    assert 0 < row["metrics"]["trunc_rms"] < 0.5
    # the one-step profile runs a solver on two-point sub-grids, which a scheduler's own time steps cannot follow
    assert row["metrics"]["trunc_local_profile"].startswith("n/a")


@pytest.mark.slow
def test_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench", "run", "model=gmm", "solver=diffusers",
                        "solver.scheduler=DPMSolverMultistepScheduler", "nfe=10", "n_samples=16", "metrics=[trunc]",
                        f"results_dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


# --- errors ----------------------------------------------------------------------------------------------------
def test_bad_names_and_keys(disc):
    m, x_T = disc
    spec = get_solver("diffusers")
    with pytest.raises(ConfigError, match="unknown scheduler 'NoSuchScheduler'.*DDIMScheduler.*UniPCMultistep"):
        spec.nfe_of_steps(10, scheduler="NoSuchScheduler")
    with pytest.raises(ConfigError, match="EDMEulerScheduler' cannot run"):
        spec.nfe_of_steps(10, scheduler="EDMEulerScheduler")
    with pytest.raises(ConfigError, match="no config key 'solver_ordr'"):
        spec.nfe_of_steps(10, scheduler="DPMSolverMultistepScheduler", config={"solver_ordr": 3})
    with pytest.raises(ConfigError, match="set by the solver"):
        spec.nfe_of_steps(10, config={"beta_end": 0.012})
    with pytest.raises(ConfigError, match="prediction_type"):
        spec.nfe_of_steps(10, config={"prediction_type": "v_prediction"})
    with pytest.raises(ConfigError, match="moves the scheduler's noise levels"):
        spec.nfe_of_steps(10, config={"rescale_betas_zero_snr": True})
    with pytest.raises(ConfigError, match="no argument 'etaa'"):
        spec.nfe_of_steps(10, step_kwargs={"etaa": 1.0})
    with pytest.raises(ConfigError, match="has no knob"):
        solver_from_cfg({"name": "diffusers", "schedulr": "DDIMScheduler"})
    with pytest.raises(ConfigError, match="unknown scheduler"):
        run_diffusers(m, x_T[:2], 5, "DDIM")
    with pytest.raises(ConfigError, match="no config key 'foo'"):
        run_diffusers(m, x_T[:2], 5, "DDIMScheduler", config={"foo": 1})


def test_non_vp_schedule():
    m = load_model({"name": "gmm", "schedule": {"name": "edm"}})
    with pytest.raises(ConfigError, match="'edm'"):
        run_diffusers(m, torch.zeros(2, *m.shape, dtype=torch.float64), 5, "DDIMScheduler")


def test_without_diffusers(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)          # import diffusers -> ImportError
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[hf\]"'):
        get_solver("diffusers").nfe_of_steps(10, scheduler="DDIMScheduler", config={"timestep_spacing": "leading"})


# --- randomness ------------------------------------------------------------------------------------------------
STOCHASTIC = [("DDPMScheduler", None), ("EulerAncestralDiscreteScheduler", None), ("DDIMScheduler", {"eta": 1.0})]


@pytest.mark.parametrize("scheduler,step_kwargs", STOCHASTIC, ids=[s for s, _ in STOCHASTIC])
def test_stochastic_sample_independent_of_batch(disc, scheduler, step_kwargs):
    m, _ = disc

    def sample(indices, seed=3):
        rng = PerSampleRNG(seed, indices, dtype=torch.float64)
        x_T = rng.randn(m.shape) * m.schedule.prior_std()
        return run_diffusers(m, x_T, 8, scheduler, rng=rng, step_kwargs=step_kwargs)[0]

    state = torch.random.get_rng_state()
    batch, alone = sample(range(4)), sample([2])
    assert torch.equal(torch.random.get_rng_state(), state)           # torch's global generator is never touched
    torch.testing.assert_close(alone[0], batch[2], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(sample(range(4), seed=4), batch)        # the seed matters
    with pytest.raises(ConfigError, match="per-sample rng"):
        run_diffusers(m, batch, 8, scheduler, rng=None, step_kwargs=step_kwargs)


def test_stochastic_detection():
    def probe(scheduler, config=None, step_kwargs=None):
        cls = ds._scheduler_class(scheduler)
        sched = ds._build(cls, ds._check_config(cls, config), 1000)
        sched.set_timesteps(6)
        return ds.is_stochastic(sched, step_kwargs or {})

    assert not probe("DDIMScheduler") and probe("DDIMScheduler", step_kwargs={"eta": 0.5})
    assert not probe("DPMSolverMultistepScheduler") and probe("DPMSolverMultistepScheduler",
                                                               {"algorithm_type": "sde-dpmsolver++"})
    assert not probe("EulerDiscreteScheduler") and probe("EulerDiscreteScheduler", step_kwargs={"s_churn": 1.0})
    assert probe("DDPMScheduler") and probe("EulerAncestralDiscreteScheduler")
