"""Stochastic samplers: moment convergence on the exact GMM, identities with the ODE solvers, counted NFE,
per-sample determinism for every registered solver, and clear errors for impossible settings."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bench.orders import solve
from bench.run import generate
from bench.models.dynamics import Dynamics
from bench.models.errors import ConfigError
from bench.solvers.registry import SOLVERS, get_solver
from bench.solvers.rng import PerSampleRNG
from bench.solvers.timesteps import make_timesteps

CONF = Path(__file__).resolve().parents[1] / "conf" / "solver"
STOCHASTIC = ["euler_maruyama", "ancestral", "edm_stochastic", "pc"]


class BatchRNG:
    """One generator for the whole batch: fast for 20k-sample moment tests (batch independence is tested
    separately with PerSampleRNG, the benchmark's generator)."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.g, dtype=x.dtype)

    def increment(self, x, t_from, t_to):
        return self.randn_like(x)


def sample(model, name, nfe, x_T, rng, timesteps=None, **knobs):
    return solve(model, name, nfe, x_T, timesteps, rng=rng, **knobs)


# --- moments against the exact data distribution ---------------------------------------------------------------
N_MOMENTS = 20000


@pytest.fixture(scope="module")
def prior_draw(gmm_model):
    g = torch.Generator().manual_seed(1)
    return torch.randn(N_MOMENTS, *gmm_model.shape, dtype=torch.float64, generator=g) * gmm_model.schedule.prior_std()


def moment_errors(x, gmm):
    """(||mean - mu||, ||cov - C||_F) and their sampling standard errors estimated from the samples."""
    n = x.shape[0]
    mu, C = gmm.mean(), gmm.cov()
    c = x - x.mean(0)
    cov = c.T @ c / (n - 1)
    se_mean = float(torch.sqrt(torch.trace(cov) / n))
    prods = (c[:, :, None] * c[:, None, :]).reshape(n, -1)
    se_cov = float(torch.sqrt(prods.var(0).sum() / n))
    return float((x.mean(0) - mu).norm()), float((cov - C).norm()), se_mean, se_cov


@pytest.mark.parametrize("name,knobs,budgets", [
    ("euler_maruyama", {}, [5, 10, 20]),
    ("ancestral", {"variant": "ddpm", "eta": 1.0}, [10, 20, 40]),
    ("ancestral", {"variant": "euler", "eta": 0.5}, [10, 20, 40]),
    ("edm_stochastic", {}, [9, 19, 39]),
    ("pc", {"step_size": "sigma2"}, [9, 19, 39]),
    ("pc", {"predictor": "euler_maruyama", "step_size": "sigma2"}, [9, 19, 39]),
    ("pc", {}, [9, 19, 39]),     # per-sample norms: converges only this far in 4-D (see langevin_step)
])
def test_moment_errors_shrink_with_nfe(gmm_model, prior_draw, name, knobs, budgets):
    errs = []
    for b in budgets:
        x, _, _ = sample(gmm_model, name, b, prior_draw, BatchRNG(2), **knobs)
        errs.append(moment_errors(x, gmm_model.data))
    total = [em + ec for em, ec, _, _ in errs]
    noise = [sm + sc for _, _, sm, sc in errs]
    assert total[0] > 10 * noise[0], (total, noise)              # the coarsest error is far above sampling noise
    for k in range(len(budgets) - 1):                            # each refinement gains > 2 noise std of the difference
        assert total[k + 1] < total[k] - 2 * (noise[k] ** 2 + noise[k + 1] ** 2) ** 0.5, (total, noise)
    assert errs[-1][0] < errs[0][0]                              # the mean error shrinks too


# --- identities ---------------------------------------------------------------------------------------------------
@pytest.fixture(params=["vp_linear", "vp_cosine", "ve", "edm"])
def any_schedule_model(request):
    from bench.models.registry import load_model
    return load_model({"name": "gmm", "schedule": {"name": request.param}})


@pytest.mark.parametrize("variant", ["ddpm", "euler"])
def test_ancestral_eta0_is_ddim_and_euler(any_schedule_model, variant):
    gmm_model = any_schedule_model
    sch = gmm_model.schedule
    x_T = PerSampleRNG(5, range(16), dtype=torch.float64).randn(gmm_model.shape)
    x_anc, _, steps = sample(gmm_model, "ancestral", 12, x_T, PerSampleRNG(0, range(16), dtype=torch.float64),
                             timesteps="logsnr", variant=variant, eta=0.0)
    x_eul, _, _ = sample(gmm_model, "euler", 12, x_T, None, timesteps="logsnr", variable="sigma_hat")
    # DDIM (Song et al. 2021a, eq. 12, eta = 0), written out independently.
    t = make_timesteps("logsnr", sch, steps)
    dyn = Dynamics(gmm_model.net, sch)
    x = x_T
    for i in range(len(t) - 1):
        eps = dyn.eps(x, t[i])
        x = sch.alpha(t[i + 1]) * dyn.x0(x, t[i], eps=eps) + sch.sigma(t[i + 1]) * eps
    x_ddim = dyn.x0(x, t[-1])
    torch.testing.assert_close(x_anc, x_ddim, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_anc, x_eul, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ancestral_ddpm_equals_euler_ancestral(any_schedule_model, eta):
    gmm_model = any_schedule_model
    # Two computations of one map for eta <= 1: DDIM's x-space update and k-diffusion's x_hat-space one.
    x_T = PerSampleRNG(5, range(16), dtype=torch.float64).randn(gmm_model.shape)
    out = [sample(gmm_model, "ancestral", 15, x_T, PerSampleRNG(0, range(16), dtype=torch.float64),
                  variant=v, eta=eta)[0] for v in ("ddpm", "euler")]
    torch.testing.assert_close(out[0], out[1], rtol=1e-9, atol=1e-9)


def test_edm_stochastic_without_churn_is_heun(any_schedule_model):
    gmm_model = any_schedule_model
    x_T = PerSampleRNG(5, range(16), dtype=torch.float64).randn(gmm_model.shape)
    x_edm, n_edm, _ = sample(gmm_model, "edm_stochastic", 17, x_T, PerSampleRNG(0, range(16), dtype=torch.float64),
                             S_churn=0.0)
    x_heun, n_heun, _ = sample(gmm_model, "heun", 17, x_T, None)
    assert n_edm == n_heun
    torch.testing.assert_close(x_edm, x_heun, rtol=1e-10, atol=1e-10)


# --- counted NFE --------------------------------------------------------------------------------------------------
FORMULAS = [
    ("euler_maruyama", {}, lambda n: n),
    ("ancestral", {"variant": "ddpm", "eta": 1.0}, lambda n: n),
    ("ancestral", {"variant": "euler", "eta": 1.5}, lambda n: n),
    ("edm_stochastic", {}, lambda n: 2 * n - 1),
    ("pc", {"n_corrector": 0}, lambda n: n),
    ("pc", {"n_corrector": 1}, lambda n: 2 * n - 1),
    ("pc", {"n_corrector": 3, "predictor": "euler_maruyama"}, lambda n: 4 * n - 3),
]


@pytest.mark.parametrize("name,knobs,formula", FORMULAS)
@pytest.mark.parametrize("budget", [2, 3, 4, 5, 10, 17, 18])
def test_counted_nfe_equals_formula(gmm_model, name, knobs, formula, budget):
    spec = get_solver(name)
    assert formula(spec.min_steps + 3) == spec.nfe_of_steps(spec.min_steps + 3, **knobs)
    if formula(spec.min_steps) > budget:
        with pytest.raises(ConfigError, match="cannot meet an NFE budget"):
            spec.steps_for(budget, **knobs)
        return
    rng = PerSampleRNG(0, range(5), dtype=torch.float64)
    _, nfe, steps = sample(gmm_model, name, budget, rng.randn(gmm_model.shape), rng, **knobs)
    assert nfe == formula(steps) <= budget
    assert formula(steps + 1) > budget


# --- per-sample determinism, every registered solver ------------------------------------------------------------
def default_knobs(name):
    path = CONF / f"{name}.yaml"
    if not path.exists():
        return {}
    return {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "name"}


def _all_solvers():
    import bench.solvers.all  # noqa: F401
    return sorted(SOLVERS)


@pytest.mark.parametrize("name", _all_solvers())
def test_same_seed_same_samples_and_batch_independent(gmm_model, name):
    spec, knobs = get_solver(name), default_knobs(name)
    budget = 500 if spec.batch_coupled else 24   # an adaptive solve at rtol 1e-5 needs a few hundred NFE
    try:
        steps = spec.steps_for(budget, **knobs)
    except ConfigError:
        if spec.nfe_of_steps(spec.min_steps, **knobs) > budget:
            pytest.skip(f"{name} needs more than {budget} NFE")
        raise
    t = make_timesteps(spec.default_timesteps, gmm_model.schedule, steps)
    cpu = torch.device("cpu")

    def run(batch_size, seed=7):
        return generate(gmm_model, spec, knobs, t, 9, batch_size, seed, cpu, torch.float64)[1]

    state = torch.random.get_rng_state()
    a, b = run(9), run(9)
    assert torch.equal(torch.random.get_rng_state(), state)     # torch's global generator is never touched
    assert torch.equal(a, b)                                     # same seed: bitwise the same
    # sample i does not depend on the batching; adaptive solvers share step-size control across the batch
    # (declared batch_coupled), so for them only to within the solve's tolerance
    tol = 1e-3 if spec.batch_coupled else 1e-12
    torch.testing.assert_close(run(4), a, rtol=tol, atol=tol)
    torch.testing.assert_close(run(1), a, rtol=tol, atol=tol)
    if spec.stochastic:
        assert not torch.allclose(run(9, seed=8), a)             # and the seed does matter


class IncrementsOnly(BatchRNG):
    def randn_like(self, x):
        raise AssertionError("a brownian solver drew noise outside rng.increment")

    def increment(self, x, t_from, t_to):
        assert t_from > t_to, (t_from, t_to)                     # an increment over a step backwards in time
        return super().randn_like(x)


@pytest.mark.parametrize("name", [n for n in _all_solvers() if SOLVERS[n].brownian])
def test_brownian_solvers_draw_only_increments(gmm_model, name):
    spec = get_solver(name)
    x_T = torch.randn(6, 4, dtype=torch.float64)
    t = make_timesteps(spec.default_timesteps, gmm_model.schedule, 6)
    spec.fn(Dynamics(gmm_model.net, gmm_model.schedule), x_T, t, IncrementsOnly(0), **default_knobs(name))


# --- clear errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,knobs,needle", [
    ("edm_stochastic", {"S_min": 2.0, "S_max": 1.0}, "S_min <= S_max"),
    ("edm_stochastic", {"S_noise": 0.0}, "S_noise must be > 0"),
    ("edm_stochastic", {"S_noise": -1.0}, "S_noise must be > 0"),
    ("edm_stochastic", {"S_churn": -1.0}, "S_churn must be >= 0"),
    ("ancestral", {"eta": -0.1}, "eta must be a number >= 0"),
    ("ancestral", {"variant": "ddpm", "eta": 1.5}, "needs 0 <= eta <= 1"),
    ("ancestral", {"variant": "ddim"}, "Valid variants are: ddpm, euler"),
    ("pc", {"snr": 0.0}, "snr must be a number > 0"),
    ("pc", {"snr": -1.0}, "snr must be a number > 0"),
    ("pc", {"n_corrector": -1}, "n_corrector must be an integer >= 0"),
    ("pc", {"n_corrector": 1.5}, "knob n_corrector=1.5 is of type float, but n_corrector takes type int"),
    ("pc", {"predictor": "ode"}, "Valid predictors are: reverse_diffusion, euler_maruyama"),
    ("pc", {"step_size": "big"}, "Valid step sizes are: norms, sigma2"),
])
def test_impossible_settings_are_config_errors(gmm_model, name, knobs, needle):
    rng = PerSampleRNG(0, range(2), dtype=torch.float64)
    with pytest.raises(ConfigError, match=needle):
        sample(gmm_model, name, 9, rng.randn(gmm_model.shape), rng, **knobs)


def test_yaml_defaults_are_the_function_defaults():
    import inspect
    for name in STOCHASTIC:
        sig = inspect.signature(get_solver(name).fn)
        for k, v in default_knobs(name).items():
            assert sig.parameters[k].default == v, (name, k)


def test_edm_defaults_follow_the_paper():
    # Karras et al. 2022, Table 5, CIFAR-10 VP: S_churn 30, S_tmin 0.01, S_tmax 1, S_noise 1.007.
    assert default_knobs("edm_stochastic") == {"S_churn": 30.0, "S_min": 0.01, "S_max": 1.0, "S_noise": 1.007}


@pytest.mark.slow
def test_cli_prints_config_error_and_records_nothing(tmp_path):
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "bench", "run", "solver=edm_stochastic", "solver.S_min=2",
                        "solver.S_max=1", "n_samples=8", f"results_dir={tmp_path}"], cwd=root, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 2 and "S_min <= S_max" in r.stderr and "Traceback" not in r.stderr
    from bench import store
    assert len(store.load_runs(tmp_path)) == 0          # the store is opened before any work; no row recorded
