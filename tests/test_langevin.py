"""Annealed Langevin dynamics (solver annealed_langevin, Song & Ermon 2019, Alg. 1) on the exact GMM, float64.

- Levels against the data: with enough Langevin steps per noise e-fold the samples' mean and covariance equal the
  exact data moments within Z = 4.5 standard errors (helpers of tests/test_stochastic_levels.py).  The bias that
  remains is the chain's lag behind the shrinking noise (over-dispersion; it grows as the steps per e-fold of sigma
  times eps/sigma_L^2 shrink): measured with 40 000 samples, 20 levels x 25 steps at eps = 0.8 sigma_L^2 leave
  1.5 standard errors (at n = 4000) on one covariance entry, 40 x 20 below 1.0, 25 x 40 below 0.8.
- Exact law on a Gaussian: with one mixture component every Langevin move is linear, so the output's mean and
  covariance follow a closed recursion; the sampler matches it after a few steps, on VP, VE and sub-VP schedules,
  which pins the x_hat = x/alpha coordinates, the step sizes alpha_i = eps sigma_i^2/sigma_L^2 and the denoise.
- NFE counted = levels x steps_per_level = the registry's formula; bad knobs are ConfigErrors before any evaluation;
  per-sample randomness (batch independence, seed dependence).
"""
from __future__ import annotations

import pytest
import torch

from bench.models.dynamics import Dynamics
from bench.models.errors import ConfigError
from bench.models.registry import load_model
from bench.run import generate
from bench.solvers.registry import get_solver, solver_from_cfg
from bench.solvers.rng import PerSampleRNG
from bench.solvers.timesteps import make_timesteps

from tests.test_solvers_stochastic import BatchRNG
from tests.test_stochastic_levels import Z, assert_levels, level_z, mixture_at, sample_from_exact_q_T

NAME = "annealed_langevin"


def _eps(model, r):
    """eps = r sigma_L^2: r is the step relative to the level's own variance at every level (alpha_i / sigma_i^2)."""
    s = model.schedule
    return float(r * s.sigma_hat(s.t_min) ** 2)


# ------------------------------------------------------------------------------------- levels against the data
# (schedule, levels L, steps_per_level T, r, denoise, samples): NFE = L T on the default logsnr grid (geometric sigma)
QUICK = [("vp_linear", 40, 20, 0.8, True, 3000)]     # bias measured with 40 000 samples: max 0.8 SE at n = 3000
SLOW = [                                              # about a minute each
    ("vp_linear", 40, 50, 0.8, True, 12000),
    ("vp_linear", 40, 50, 0.8, False, 12000),
    ("ve", 40, 50, 0.8, True, 12000),
    ("sub_vp", 40, 50, 0.8, True, 12000),
]


def _id(c):
    return "{}-L{}-T{}-r{}-denoise{}-n{}".format(*c)


def _levels(sched, L, T, r, denoise, n, seed):
    m = load_model({"name": "gmm", "schedule": {"name": sched}})
    x = sample_from_exact_q_T(m, NAME, L * T, n, seed=seed, steps_per_level=T, eps=_eps(m, r), denoise=denoise)
    return assert_levels(x, mixture_at(m.data), what=_id((sched, L, T, r, denoise, n)))


@pytest.mark.parametrize("sched,L,T,r,denoise,n", QUICK, ids=[_id(c) for c in QUICK])
def test_annealed_langevin_matches_data_moments(sched, L, T, r, denoise, n):
    _levels(sched, L, T, r, denoise, n, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("sched,L,T,r,denoise,n", SLOW, ids=[_id(c) for c in SLOW])
def test_annealed_langevin_matches_data_moments_many_samples(sched, L, T, r, denoise, n):
    _levels(sched, L, T, r, denoise, n, seed=1)


def test_too_few_steps_per_level_is_visibly_biased(gmm_model):
    """The level check sees the lag: 10 levels of 10 steps (r = 0.8) leave the samples over-dispersed."""
    x = sample_from_exact_q_T(gmm_model, NAME, 100, 4000, steps_per_level=10, eps=_eps(gmm_model, 0.8))
    zm, zc, zt = level_z(x.double(), *mixture_at(gmm_model.data))
    assert zt > Z, (zm, zc, zt)


# ------------------------------------------------------------------------------------- exact law on one Gaussian
def _gaussian_recursion(model, t, T, eps, denoise):
    """Mean and covariance of annealed Langevin's output for data N(mu, S), from x_T ~ N(0, prior_std^2 I):
    at level sigma the score of p_sigma = N(mu, S + sigma^2 I) is -A (x - mu), A = (S + sigma^2 I)^-1, so a move
    x <- x + h/2 score + sqrt(h) z maps (m, C) to (M m + h/2 A mu, M C M^T + h I) with M = I - h/2 A; the denoise
    x + sigma^2 score maps it with D = I - sigma^2 A."""
    s, gmm = model.schedule, model.data
    mu, S = gmm.means[0], gmm.covs[0]
    d = mu.numel()
    eye = torch.eye(d, dtype=torch.float64)
    sig = s.sigma_hat(t)
    m = torch.zeros(d, dtype=torch.float64)
    C = (s.prior_std() / s.alpha(t[0])) ** 2 * eye
    for i in range(len(t)):
        A = torch.linalg.inv(S + sig[i] ** 2 * eye)
        h = eps * sig[i] ** 2 / sig[-1] ** 2
        M = eye - h / 2 * A
        last = i == len(t) - 1
        for _ in range(T - 1 if (denoise and last) else T):
            m, C = M @ m + h / 2 * A @ mu, M @ C @ M.T + h * eye
    if denoise:
        D = eye - sig[-1] ** 2 * A
        m, C = D @ m + sig[-1] ** 2 * A @ mu, D @ C @ D.T
    return m, C


@pytest.mark.parametrize("sched", ["vp_linear", "ve", "sub_vp"])
@pytest.mark.parametrize("denoise", [True, False])
def test_output_law_on_a_gaussian_is_the_exact_recursion(sched, denoise):
    m = load_model({"name": "gmm", "n_components": 1, "schedule": {"name": sched}})
    T, L, n = 3, 6, 6000
    t = make_timesteps("logsnr", m.schedule, L)
    eps = _eps(m, 0.5)
    x_T = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * m.schedule.prior_std()
    dyn = Dynamics(m.net, m.schedule)
    x = get_solver(NAME).fn(dyn, x_T, t, BatchRNG(4), steps_per_level=T, eps=eps, denoise=denoise)
    assert dyn.nfe == L * T
    mean, cov = _gaussian_recursion(m, t, T, eps, denoise)
    one = torch.ones(1, dtype=torch.float64)
    assert_levels(x, (one, mean[None], cov[None]), what=f"{sched} denoise={denoise}")
    # after 18 moves the chain is far from the data: the data's moments fail the same check
    with pytest.raises(AssertionError):
        assert_levels(x, mixture_at(m.data))


# ------------------------------------------------------------------------------------- NFE, knobs, randomness
@pytest.mark.parametrize("T", [1, 3, 7])
@pytest.mark.parametrize("denoise", [True, False])
@pytest.mark.parametrize("budget", [2, 5, 14, 15, 22])
def test_counted_nfe_is_levels_times_steps_per_level(gmm_model, T, denoise, budget):
    spec = get_solver(NAME)
    assert spec.nfe_formula == "steps*steps_per_level" and spec.min_steps == 2
    if 2 * T > budget:
        with pytest.raises(ConfigError, match="cannot meet an NFE budget"):
            spec.steps_for(budget, steps_per_level=T)
        return
    L = spec.steps_for(budget, steps_per_level=T)
    assert L == budget // T                          # the budget is used, not rounded down further
    t = make_timesteps(spec.default_timesteps, gmm_model.schedule, L)
    dyn = Dynamics(gmm_model.net, gmm_model.schedule)
    spec.fn(dyn, torch.randn(3, 4, dtype=torch.float64), t, BatchRNG(0), steps_per_level=T, eps=1e-5, denoise=denoise)
    assert dyn.nfe == L * T == spec.nfe_of_steps(L, steps_per_level=T) <= budget


class CountingRNG(BatchRNG):
    def __init__(self, seed):
        super().__init__(seed)
        self.draws = 0

    def randn_like(self, x):
        self.draws += 1
        return super().randn_like(x)

    def increment(self, x, t_from, t_to):
        raise AssertionError("Langevin moves at a fixed level draw with randn_like, not as Brownian increments")


@pytest.mark.parametrize("denoise,draws", [(True, 4 * 3 - 1), (False, 4 * 3)])
def test_noise_draws_one_per_move(gmm_model, denoise, draws):
    rng = CountingRNG(0)
    t = make_timesteps("logsnr", gmm_model.schedule, 4)
    get_solver(NAME).fn(Dynamics(gmm_model.net, gmm_model.schedule), torch.zeros(2, 4, dtype=torch.float64), t, rng,
                        steps_per_level=3, eps=1e-5, denoise=denoise)
    assert rng.draws == draws


@pytest.mark.parametrize("knobs,needle", [
    ({"steps_per_level": 0}, "steps_per_level must be an integer >= 1"),
    ({"steps_per_level": -3}, "steps_per_level must be an integer >= 1"),
    ({"eps": 0.0}, "eps must be a finite number > 0"),
    ({"eps": -1e-5}, "eps must be a finite number > 0"),
    ({"eps": float("nan")}, "eps must be a finite number > 0"),
    ({"eps": float("inf")}, "eps must be a finite number > 0"),
])
def test_bad_knobs_are_config_errors_before_any_evaluation(gmm_model, knobs, needle):
    spec = get_solver(NAME)
    dyn = Dynamics(gmm_model.net, gmm_model.schedule)
    t = make_timesteps("logsnr", gmm_model.schedule, 3)
    with pytest.raises(ConfigError, match=needle):
        spec.fn(dyn, torch.zeros(2, 4, dtype=torch.float64), t, BatchRNG(0), **knobs)
    assert dyn.nfe == 0
    if "steps_per_level" in knobs:                   # the budget -> steps path refuses it too (no endless search)
        with pytest.raises(ConfigError, match=needle):
            spec.steps_for(100, **knobs)


@pytest.mark.parametrize("knobs,needle", [
    ({"steps_per_level": 2.5}, "knob steps_per_level=2.5 is of type float"),
    ({"denoise": "yes"}, "knob denoise='yes' is of type str"),
    ({"eps": "small"}, "knob eps='small' is of type str"),
    ({"sigma_min": 0.1}, "has no knob 'sigma_min'"),
])
def test_bad_knob_types_are_config_errors(knobs, needle):
    with pytest.raises(ConfigError, match=needle):
        solver_from_cfg({"name": NAME, **knobs})


def test_yaml_defaults_are_the_function_defaults_and_ncsn():
    import inspect
    from pathlib import Path

    from omegaconf import OmegaConf
    path = Path(__file__).resolve().parents[1] / "conf" / "solver" / f"{NAME}.yaml"
    node = OmegaConf.to_container(OmegaConf.load(path))
    sig = inspect.signature(get_solver(NAME).fn)
    knobs = {k: v for k, v in node.items() if k != "name"}
    assert knobs == {k: p.default for k, p in list(sig.parameters.items())[4:]}
    # NCSN (Song & Ermon 2019, sec. 5): T = 100, eps = 2e-5; DESIGN's final step: denoise
    assert knobs == {"steps_per_level": 100, "eps": 2e-5, "denoise": True}
    spec, _ = solver_from_cfg(node)
    assert spec.stochastic and not spec.brownian and spec.default_timesteps == "logsnr"


def test_per_sample_randomness(gmm_model):
    spec = get_solver(NAME)
    knobs = {"steps_per_level": 2, "eps": _eps(gmm_model, 0.5), "denoise": True}
    t = make_timesteps(spec.default_timesteps, gmm_model.schedule, spec.steps_for(12, **knobs))
    cpu = torch.device("cpu")

    def run(batch_size, seed=7):
        return generate(gmm_model, spec, knobs, t, 9, batch_size, seed, cpu, torch.float64)[1]

    state = torch.random.get_rng_state()
    a = run(9)
    assert torch.equal(torch.random.get_rng_state(), state)      # torch's global generator is never touched
    assert torch.equal(run(9), a)
    torch.testing.assert_close(run(4), a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run(1), a, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(run(9, seed=8), a)


def test_ve_is_ncsn_in_x_and_vp_runs_in_x_hat():
    """On ve (alpha = 1) the chain is NCSN's in x itself; on vp_linear the same chain in x_hat = x/alpha: with
    a model whose eps is eps_ve(x/alpha, t(sigma_hat)) the two runs agree on grids of the same sigma_hat."""
    ve = load_model({"name": "gmm", "schedule": {"name": "ve", "sigma_min": 0.01, "sigma_max": 50.0}})
    vp = load_model({"name": "gmm", "schedule": {"name": "vp_linear"}})
    sig = torch.tensor([50.0, 5.0, 0.5, 0.05, 0.0105], dtype=torch.float64)
    t_ve, t_vp = ve.schedule.t_of_sigma_hat(sig), vp.schedule.t_of_sigma_hat(sig)
    x_T = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 50.0
    knobs = {"steps_per_level": 3, "eps": 1e-5, "denoise": True}
    a = get_solver(NAME).fn(Dynamics(ve.net, ve.schedule), x_T, t_ve, BatchRNG(5), **knobs)
    a_vp = vp.schedule.alpha(t_vp[0])
    b = get_solver(NAME).fn(Dynamics(vp.net, vp.schedule), x_T * a_vp, t_vp, BatchRNG(5), **knobs)
    # the exact eps of the same data at the same sigma_hat is the same function of x_hat on both schedules
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
