"""DPM-Solver++ SDE and SA-Solver (solvers/sde_multistep.py) and Restart sampling (solvers/restart.py): their
deterministic limits against this repo's ODE solvers, agreement with diffusers' schedulers on the same noise, where
each draws its noise, counted NFE, strong convergence of the Brownian ones, and ConfigErrors before any network
evaluation.

Golden steps of every knob value: tests/test_golden_steps.py; sample moments against the exact data:
tests/test_stochastic_levels.py.
"""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bench.metrics.trunc import fit_order, strong_error
from bench.models.dynamics import Dynamics
from bench.models.errors import ConfigError
from bench.models.registry import load_model
from bench.solvers.registry import get_solver
from bench.solvers.rng import PerSampleRNG, TorchGeneratorRNG
from bench.solvers.timesteps import make_timesteps

CONF = Path(__file__).resolve().parents[1] / "conf" / "solver"
NAMES = ("dpm_solver_pp_sde", "sa_solver", "restart")
ALL_SIGMA = {"tau_sigma_min": 0.0, "tau_sigma_max": math.inf}
EXACT = 1e-12


class ReplayRNG:
    """The same standard normals, in call order, whichever method asks; logs (method, t_from) of each draw."""

    def __init__(self, seed=3):
        self.g, self.log = torch.Generator().manual_seed(seed), []

    def randn_like(self, x):
        self.log.append(("randn_like", None))
        return torch.randn(x.shape, generator=self.g, dtype=torch.float64).to(x.dtype)

    def increment(self, x, t_from, t_to):
        self.log.append(("increment", float(t_from)))
        return torch.randn(x.shape, generator=self.g, dtype=torch.float64).to(x.dtype)


def x_T_of(model, n=32, seed=5):
    return PerSampleRNG(seed, range(n), dtype=torch.float64).randn(model.shape) * model.schedule.prior_std()


def run(model, name, t, x_T, rng=None, **knobs):
    dyn = Dynamics(model.net, model.schedule)
    with torch.inference_mode():
        out = get_solver(name).fn(dyn, x_T.clone(), t, rng, **knobs)
    return out, dyn.nfe


def rel_diff(a, b):
    return float((a - b).abs().max()) / float(b.abs().max())


def grid(model, name, steps, kind=None):
    return make_timesteps(kind or get_solver(name).default_timesteps, model.schedule, steps)


# --- deterministic limits ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [5, 9, 20])
@pytest.mark.parametrize("order,d2,lof", [(2, "taylor", True), (3, "taylor", True), (3, "taylor", False),
                                          (3, "dpm_solver_code", True), (3, "dpm_solver_code", False)])
def test_pp_sde_with_eta_0_is_dpm_solver_pp(gmm_model, steps, order, d2, lof):
    """eta = 0 (no noise, rng None: nothing is drawn) is DPM-Solver++(2M/3M) with the same d2 and lower_order_final,
    solver_type midpoint (dpm_solver_pp's second-order step, Lu et al. 2022b, Alg. 2)."""
    t, x_T = grid(gmm_model, "dpm_solver_pp", steps), x_T_of(gmm_model)
    a, nfe_a = run(gmm_model, "dpm_solver_pp_sde", t, x_T, None, order=order, eta=0.0, solver_type="midpoint", d2=d2,
                   lower_order_final=lof)
    b, nfe_b = run(gmm_model, "dpm_solver_pp", t, x_T, None, order=order, d2=d2, lower_order_final=lof)
    assert nfe_a == nfe_b == steps
    assert rel_diff(a, b) <= EXACT


def test_pp_sde_solver_types_are_different_second_order_methods(gmm_model):
    """heun (phi_2 D1) and midpoint ((1 - e^{-h})/2 D1) differ at eta = 0 by O(h^3) per step: clearly at 6 steps, and
    both are second order on the probability-flow ODE (errors against a 1e-11 dopri5 solve, NFE 32 -> 128)."""
    from bench.metrics.trunc import reference_solve
    x_T = x_T_of(gmm_model, 16)
    t6 = grid(gmm_model, "dpm_solver_pp_sde", 6)
    a, _ = run(gmm_model, "dpm_solver_pp_sde", t6, x_T, eta=0.0, solver_type="heun")
    b, _ = run(gmm_model, "dpm_solver_pp_sde", t6, x_T, eta=0.0, solver_type="midpoint")
    assert rel_diff(a, b) > 1e-3
    sch = gmm_model.schedule
    exact = reference_solve(gmm_model.net, sch, x_T, sch.T, sch.t_min, 1e-11, 1e-11)[0]
    for st in ("heun", "midpoint"):
        errs = [float((run(gmm_model, "dpm_solver_pp_sde", grid(gmm_model, "dpm_solver_pp_sde", n), x_T, eta=0.0,
                           solver_type=st)[0] - exact).pow(2).mean().sqrt()) for n in (32, 64, 128)]
        p, _ = fit_order([32, 64, 128], errs)
        assert abs(p - 2) < 0.25, (st, errs, p)


@pytest.mark.parametrize("steps", [5, 9, 20])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_sa_with_tau_0_is_unipc_bh1(gmm_model, steps, p):
    """tau = 0, predictor p, corrector p + 1 (order2 sa_solver_code) is UniPC-p with B(h) = h and no lowered last step:
    SA-Predictor p integrates the Lagrange interpolant through p predictions exactly as UniP-p does for p >= 3, UniP-2's
    fixed weight 1/2 with B(h) = h is the SA code's two-node weight, UniP-1 is DDIM; the SA-Corrector on p + 1 nodes is
    UniC-p (exact for p >= 2, the two-node weight for p = 1).  Both reuse the evaluation at the predicted point."""
    t, x_T = grid(gmm_model, "unipc", steps), x_T_of(gmm_model)
    a, nfe_a = run(gmm_model, "sa_solver", t, x_T, None, predictor_order=p, corrector_order=p + 1, tau=0.0)
    b, nfe_b = run(gmm_model, "unipc", t, x_T, None, order=p, variant="bh1", lower_order_final=False)
    assert nfe_a == nfe_b == steps
    assert rel_diff(a, b) <= EXACT


@pytest.mark.parametrize("p,tau", [(2, 0.0), (3, 0.0), (2, 0.8), (3, 1.3)])
def test_sa_predictor_alone_is_pp_sde_heun(gmm_model, p, tau):
    """SA-Predictor alone (corrector 0) with the exact Lagrange integral and tau on every step is DPM-Solver++ SDE with
    eta = tau^2, solver_type heun, d2 taylor and no lowered last step, on the same increments: two derivations (Lagrange
    moments of the kernel; phi functions of the Taylor expansion) of one exponential integrator of one SDE."""
    t, x_T = grid(gmm_model, "sa_solver", 12), x_T_of(gmm_model)
    a, _ = run(gmm_model, "sa_solver", t, x_T, ReplayRNG(), predictor_order=p, corrector_order=0, tau=tau,
               order2="lagrange", **ALL_SIGMA)
    b, _ = run(gmm_model, "dpm_solver_pp_sde", t, x_T, ReplayRNG(), order=p, eta=tau ** 2, solver_type="heun",
               d2="taylor", lower_order_final=False)
    assert rel_diff(a, b) <= EXACT


def test_sa_order_1_predictor_alone_is_ddim(gmm_model):
    t, x_T = grid(gmm_model, "sa_solver", 10), x_T_of(gmm_model)
    a, _ = run(gmm_model, "sa_solver", t, x_T, None, predictor_order=1, corrector_order=0, tau=0.0)
    b, _ = run(gmm_model, "dpm_solver_pp", t, x_T, None, order=1)
    assert rel_diff(a, b) <= EXACT


def test_sa_corrector_and_order2_variant_change_the_result(gmm_model):
    """The corrector is applied (predictor-only differs) and order2 is a real variant (O(h^3) per two-node step)."""
    t, x_T = grid(gmm_model, "sa_solver", 8), x_T_of(gmm_model)
    out = {k: run(gmm_model, "sa_solver", t, x_T, ReplayRNG(), **kn)[0] for k, kn in {
        "pc": {}, "p": {"corrector_order": 0}, "lagrange": {"order2": "lagrange"}}.items()}
    assert rel_diff(out["pc"], out["p"]) > 1e-3 and rel_diff(out["pc"], out["lagrange"]) > 1e-6


def test_sa_tau_applies_on_its_sigma_range(gmm_model):
    """A step draws (and adds) noise exactly when sigma_hat at its start lies in [tau_sigma_min, tau_sigma_max]; the
    corrector reuses the predictor's increment (one draw per noisy step)."""
    t, x_T = grid(gmm_model, "sa_solver", 12), x_T_of(gmm_model, 4)
    sig = gmm_model.schedule.sigma_hat(t).tolist()
    for lo, hi in ((0.72, 25.1), (0.0, 3.0), (5.0, math.inf), (0.0, 0.0)):
        rng = ReplayRNG()
        run(gmm_model, "sa_solver", t, x_T, rng, tau_sigma_min=lo, tau_sigma_max=hi)
        want = [("increment", float(t[i])) for i in range(len(t) - 1) if lo <= sig[i] <= hi]
        assert rng.log == want and (lo == hi == 0.0 or want)


def test_sa_default_tau_range_is_the_papers_t_range(gmm_model):
    """tau = 1 on t in [0.2, 0.8] (the paper's ldm/diffusers default, tau(t) = 1 for 200 <= t <= 800 of 1000) is
    sigma_hat in [0.7204, 25.11] on vp_linear (DDPM's linear betas in continuous time): the defaults, rounded."""
    sch = gmm_model.schedule
    lo, hi = (float(sch.sigma_hat(torch.tensor(v, dtype=torch.float64))) for v in (0.2, 0.8))
    d = yaml_knobs("sa_solver")
    assert d["tau_sigma_min"] == pytest.approx(lo, rel=1e-3) and d["tau_sigma_max"] == pytest.approx(hi, rel=1e-3)
    assert (d["predictor_order"], d["corrector_order"], d["tau"]) == (3, 4, 1.0)   # README of the paper's code


# --- diffusers' schedulers on the same noise -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def disc():
    pytest.importorskip("diffusers")
    m = load_model({"name": "gmm", "schedule": {"name": "vp_discrete"}})
    return m, x_T_of(m, 16)


def _diffusers(m, x_T, steps, scheduler, config, rng):
    from tests.test_diffusers_solver import run_diffusers, scheduler_grid
    return scheduler_grid(m, steps, scheduler, config), run_diffusers(m, x_T, steps, scheduler, config, rng=rng)[0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_pp_sde_2m_is_diffusers_sde_dpmsolver_pp(disc, steps, solver_type):
    """DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++', solver_order=2) on its own time steps, its
    variance_noise our increments: the same samples up to its float32 step (measured <= 1.6e-6)."""
    m, x_T = disc
    cfg = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": solver_type}
    t, b = _diffusers(m, x_T, steps, "DPMSolverMultistepScheduler", cfg, ReplayRNG())
    a, _ = run(m, "dpm_solver_pp_sde", t, x_T, ReplayRNG(), order=2, eta=1.0, solver_type=solver_type)
    assert float((a - b).abs().max()) <= 5e-6


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pp_sde_3m_differs_from_diffusers_by_its_d2_weight(disc, monkeypatch):
    """diffusers' third-order sde-dpmsolver++ (0.42.1) weights D2 by alpha_t ((1 - e^{-H} - H)/H^2 - 1/2), H = 2h, which
    tends to -alpha_t as h -> 0, where the expansion (ours, and k-diffusion's 3M SDE at half) needs -alpha_t phi_3(H) =
    O(h): the samples differ by O(1) at 10 steps, and swapping in that one weight reproduces diffusers to its
    float32."""
    import bench.solvers.sde_multistep as sm
    m, x_T = disc
    cfg = {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}
    t, b = _diffusers(m, x_T, 10, "DPMSolverMultistepScheduler", cfg, ReplayRNG())
    a, _ = run(m, "dpm_solver_pp_sde", t, x_T, ReplayRNG(), order=3, eta=1.0, d2="dpm_solver_code")
    assert float((a - b).abs().max()) > 0.1
    orig = sm.pp_sde_update

    def with_diffusers_d2(g, x, i, hist, order, eta, solver_type="midpoint", d2="taylor", z=None):
        out = orig(g, x, i, hist, order, eta, solver_type, "dpm_solver_code", z)
        if order < 3:
            return out
        h = g.lam[i + 1] - g.lam[i]
        H = (1 + eta) * h
        r0, r1 = (g.lam[i] - g.lam[i - 1]) / h, (g.lam[i - 1] - g.lam[i - 2]) / h
        D2 = ((hist[0] - hist[1]) / r0 - (hist[1] - hist[2]) / r1) / (r0 + r1)
        phi3 = (math.expm1(-H) / H + 1) / H - 0.5
        return out + g.point(i + 1)[1] * (phi3 + (-math.expm1(-H) - H) / H ** 2 - 0.5) * D2
    monkeypatch.setattr(sm, "pp_sde_update", with_diffusers_d2)
    a, _ = run(m, "dpm_solver_pp_sde", t, x_T, ReplayRNG(), order=3, eta=1.0)
    assert float((a - b).abs().max()) <= 5e-6


SA_PAIRS = [(1, 2, 0.0), (2, 3, 0.0), (3, 4, 0.0), (2, 2, 1.0), (3, 4, 1.0), (3, 3, 0.5), (1, 1, 1.0), (4, 4, 0.7)]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("p,c,tau", SA_PAIRS)
def test_sa_solver_is_diffusers_sasolver(disc, p, c, tau):
    """SASolverScheduler (the authors' port, data prediction) with a constant tau_func and lower_order_final off, its
    noise from the same per-sample generators, on its time steps; it stops at its sigma_last (timestep 0, t = 1/N)
    without denoising, so its output's x0-prediction is compared with ours on that grid plus t = 1/N (measured
    <= 3.5e-12)."""
    m, x_T = disc
    cfg = {"predictor_order": p, "corrector_order": c, "tau_func": (lambda _t: tau), "lower_order_final": False}
    t, b = _diffusers(m, x_T, 8, "SASolverScheduler", cfg, TorchGeneratorRNG(4, range(len(x_T)), dtype=torch.float64))
    t = torch.cat([t, torch.tensor([1.0 / m.schedule.N], dtype=torch.float64)])
    a, _ = run(m, "sa_solver", t, x_T, TorchGeneratorRNG(4, range(len(x_T)), dtype=torch.float64), predictor_order=p,
               corrector_order=c, tau=tau, **ALL_SIGMA)
    b0 = Dynamics(m.net, m.schedule).x0(b, t[-1])
    assert float((a - b0).abs().max()) <= 1e-10


# --- Restart ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("restart", [[], [[0.1, 1.0, 0, 3]]])
def test_restart_without_restarts_is_heun(gmm_model, restart):
    t, x_T = grid(gmm_model, "heun", 12), x_T_of(gmm_model)
    a, nfe_a = run(gmm_model, "restart", t, x_T, None, restart=restart)
    b, nfe_b = run(gmm_model, "heun", t, x_T, None)
    assert nfe_a == nfe_b == 2 * 12 - 1 and rel_diff(a, b) <= 1e-14


class SigmaLog:
    """The network, logging the sigma_hat of every evaluation."""

    def __init__(self, model):
        self.model, self.sig = model, []

    def __call__(self, x, tt):
        self.sig.append(float(self.model.schedule.sigma_hat(tt.double().reshape(-1)[0])))
        return self.model.net(x, tt)


def test_restart_runs_at_the_nearest_grid_point(gmm_model):
    """Every restart is K re-solves of [s_j, sigma_max] right after the main step that reaches the grid point s_j
    nearest to sigma_min: 2*steps evaluations each, from sigma_max down to s_j, on EDM's rho = 7 grid, and one noise
    draw."""
    sch = gmm_model.schedule
    t = grid(gmm_model, "restart", 10)
    sig = sch.sigma_hat(t).tolist()
    restart = [[0.06, 0.30, 2, 3], [1.0, 4.0, 1, 2]]
    log, rng = SigmaLog(gmm_model), ReplayRNG()
    with torch.inference_mode():
        get_solver("restart").fn(Dynamics(log, sch), x_T_of(gmm_model, 4), t, rng, restart=restart)
    assert len(log.sig) == 2 * 10 - 1 + 2 * (2 * 3 + 1 * 2)
    assert rng.log == [("randn_like", None)] * 3
    expect = []                            # main Heun: evaluations at s_k and s_{k+1}; then each restart's
    for k in range(9):
        expect += [sig[k], sig[k + 1]]
        for s_min, s_max, K, n in restart:
            j = min(range(len(sig)), key=lambda m: abs(sig[m] - s_min))
            if j == k + 1:
                sub = [(s_max ** (1 / 7) + i / n * (sig[j] ** (1 / 7) - s_max ** (1 / 7))) ** 7 for i in range(n + 1)]
                expect += [s for _ in range(K) for i in range(n) for s in (sub[i], sub[i + 1])]
    expect.append(sig[-1])
    assert log.sig == pytest.approx(expect, rel=1e-9)


def test_restart_sigma_min_values_that_snap_alike_give_the_same_samples(gmm_model):
    t, x_T = grid(gmm_model, "restart", 10), x_T_of(gmm_model)
    sig = gmm_model.schedule.sigma_hat(t).tolist()
    j = 6
    outs = [run(gmm_model, "restart", t, x_T, ReplayRNG(), restart=[[s, 4.0 * sig[j], 1, 2]])[0]
            for s in (sig[j], 0.9 * sig[j] + 0.1 * sig[j + 1], 0.9 * sig[j] + 0.1 * sig[j - 1])]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


RESTARTS = [[], [[0.06, 0.30, 2, 2]], [[0.06, 0.30, 3, 1], [0.3, 2.0, 2, 4]], [[0.5, 5.0, 0, 7]]]


@pytest.mark.parametrize("restart", RESTARTS)
@pytest.mark.parametrize("budget", [9, 20, 43, 60])
def test_restart_counted_nfe_is_the_declared_one(gmm_model, restart, budget):
    spec = get_solver("restart")
    extra = 2 * sum(K * n for _, _, K, n in restart)
    assert all(spec.nfe_of_steps(s, restart=restart) == 2 * s - 1 + extra for s in range(2, 30))
    if 3 + extra > budget:
        with pytest.raises(ConfigError, match="cannot meet an NFE budget"):
            spec.steps_for(budget, restart=restart)
        return
    steps = spec.steps_for(budget, restart=restart)
    assert spec.nfe_of_steps(steps, restart=restart) <= budget < spec.nfe_of_steps(steps + 1, restart=restart)
    _, nfe = run(gmm_model, "restart", grid(gmm_model, "restart", steps), x_T_of(gmm_model, 4), ReplayRNG(),
                 restart=restart)
    assert nfe == spec.nfe_of_steps(steps, restart=restart)


@pytest.mark.parametrize("name,knobs", [("dpm_solver_pp_sde", {}), ("dpm_solver_pp_sde", {"order": 3}),
                                        ("sa_solver", {}), ("sa_solver", {"corrector_order": 0}),
                                        ("sa_solver", {"predictor_order": 4, "corrector_order": 1})])
@pytest.mark.parametrize("budget", [2, 7, 20])
def test_multistep_counted_nfe_is_steps(gmm_model, name, knobs, budget):
    spec = get_solver(name)
    steps = spec.steps_for(budget, **knobs)
    _, nfe = run(gmm_model, name, grid(gmm_model, name, steps), x_T_of(gmm_model, 4), ReplayRNG(), **knobs)
    assert steps == budget == nfe


# --- bad knobs: ConfigErrors before any work -------------------------------------------------------------------------
PLAN_ERRORS = [
    ("dpm_solver_pp_sde", {"order": 1}, "order=1 is not available"),
    ("dpm_solver_pp_sde", {"order": 4}, "Valid values are: 2, 3"),
    ("dpm_solver_pp_sde", {"eta": -0.1}, "eta must be a finite number >= 0"),
    ("dpm_solver_pp_sde", {"eta": math.nan}, "eta must be a finite number >= 0"),
    ("dpm_solver_pp_sde", {"solver_type": "euler"}, "Valid values are: midpoint, heun"),
    ("dpm_solver_pp_sde", {"d2": "half"}, "Valid values are: taylor, dpm_solver_code"),
    ("sa_solver", {"predictor_order": 0}, "Valid values are: 1, 2, 3, 4"),
    ("sa_solver", {"predictor_order": 5}, "predictor_order=5 is not available"),
    ("sa_solver", {"corrector_order": -1}, "Valid values are: 0, 1, 2, 3, 4"),
    ("sa_solver", {"corrector_order": 5}, "corrector_order=5 is not available"),
    ("sa_solver", {"tau": -0.5}, "tau must be a finite number >= 0"),
    ("sa_solver", {"tau": math.inf}, "tau must be a finite number >= 0"),
    ("sa_solver", {"tau_sigma_min": 2.0, "tau_sigma_max": 1.0}, "need tau_sigma_min <= tau_sigma_max"),
    ("sa_solver", {"tau_sigma_min": -1.0}, "tau_sigma_min must be a finite number >= 0"),
    ("sa_solver", {"order2": "unipc"}, "Valid values are: sa_solver_code, lagrange"),
    ("restart", {"restart": [[0.06, 0.3, -1, 2]]}, "K .* must be an integer >= 0"),
    ("restart", {"restart": [[0.06, 0.3, 2, 0]]}, "steps .* must be an integer >= 1"),
    ("restart", {"restart": [[0.06, 0.3, 2, 1.5]]}, "steps .* must be an integer >= 1"),
    ("restart", {"restart": [[0.3, 0.06, 2, 2]]}, "0 < sigma_min < sigma_max"),
    ("restart", {"restart": [[0.06, 0.3, 2]]}, "is not a 4-item list"),
    ("restart", {"restart": "0.06,0.3,2,2"}, "restart must be a list of"),
    ("restart", {"S_noise": 0.0}, "S_noise must be a number > 0"),
]


@pytest.mark.parametrize("name,knobs,needle", PLAN_ERRORS)
def test_bad_knobs_are_config_errors_when_the_budget_is_planned(gmm_model, name, knobs, needle):
    """Refused by the spec's NFE function (bench.run.plan calls it before loading the model) and by the solver
    itself before its first evaluation."""
    spec = get_solver(name)
    with pytest.raises(ConfigError, match=needle):
        spec.steps_for(40, **knobs)
    dyn = Dynamics(gmm_model.net, gmm_model.schedule)
    with pytest.raises(ConfigError, match=needle):
        spec.fn(dyn, x_T_of(gmm_model, 2), grid(gmm_model, name, 12), ReplayRNG(), **knobs)
    assert dyn.nfe == 0


@pytest.mark.parametrize("restart,needle", [
    ([[0.005, 0.3, 1, 2]], r"outside the model's sigma_hat range \[0.010486, 152.167\]"),
    ([[0.06, 200.0, 1, 2]], "outside the model's sigma_hat range"),
    ([[0.7, 1.0, 1, 2]], "sigma_hat = 1.23817 .*not below sigma_max"),   # grid 152, 20.6, 1.24, 0.0105: 0.7 -> 1.24
    ([[100.0, 150.0, 1, 2]], "the first"),                               # 100 -> 152, the grid's first point
])
def test_restart_intervals_the_model_or_grid_cannot_take_are_config_errors(gmm_model, restart, needle):
    """Intervals are checked against the model's sigma_hat range and the grid before the first evaluation."""
    dyn = Dynamics(gmm_model.net, gmm_model.schedule)
    with pytest.raises(ConfigError, match=needle):
        get_solver("restart").fn(dyn, x_T_of(gmm_model, 2), grid(gmm_model, "restart", 4), ReplayRNG(),
                                 restart=restart)
    assert dyn.nfe == 0


# --- YAML ----------------------------------------------------------------------------------------------------------
def yaml_knobs(name):
    return {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")).items() if k != "name"}


def _plain(v):
    return [_plain(e) for e in v] if isinstance(v, (list, tuple)) else v


@pytest.mark.parametrize("name", NAMES)
def test_yaml_has_every_knob_with_the_function_default_and_a_comment(name):
    params = list(inspect.signature(get_solver(name).fn).parameters.values())[4:]
    assert {p.name: _plain(p.default) for p in params} == {k: _plain(v) for k, v in yaml_knobs(name).items()}
    lines = [ln for ln in (CONF / f"{name}.yaml").read_text().splitlines() if ln and not ln.startswith(("#", "name:"))]
    assert len(lines) == len(params) and all("  # " in ln for ln in lines), lines


def test_restart_default_is_the_papers_cifar10_setting():
    """Xu et al. 2023, params_cifar10_vp.txt: 18 main steps and {"0": [3, 2, 0.06, 0.30]} (N_restart = 3 points = 2 Heun
    steps, K = 2, [t_min, t_max] = [0.06, 0.30]): NFE 2*18 - 1 + 2*2*2 = 43."""
    assert yaml_knobs("restart")["restart"] == [[0.06, 0.30, 2, 2]]
    assert get_solver("restart").steps_for(43, restart=[[0.06, 0.30, 2, 2]]) == 18


# --- strong convergence of the Brownian solvers ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def gaussian_model():
    """One Gaussian component: a linear score, so the strong error is not dominated by a few paths changing mode."""
    return load_model({"name": "gmm", "n_components": 1, "schedule": {"name": "vp_linear"}})


@pytest.mark.slow
@pytest.mark.parametrize("name,knobs", [("dpm_solver_pp_sde", {}), ("dpm_solver_pp_sde", {"order": 3}),
                                        ("sa_solver", ALL_SIGMA)])
def test_strong_error_against_the_same_brownian_path_converges_at_order_1(gaussian_model, name, knobs):
    """RMS distance to the same solver on the 4x refined grid, both driven by one Brownian path per sample
    (BrownianRNG): measured orders 1.2-1.4 (logsnr grids of 21, 41, 81 points, 64 samples; euler_maruyama: 1.0-1.1).
    With the default partial tau range SA-Solver converges only at order ~1/2: a coarse step takes tau of its start
    over the switch."""
    m = gaussian_model
    x_T = x_T_of(m, 64)
    steps = (21, 41, 81)
    errs = [strong_error(get_solver(name).fn, m, x_T, grid(m, name, s), 0, range(64), 4, knobs)[0] for s in steps]
    p, _ = fit_order([s - 1 for s in steps], errs)
    assert p > 1.0, (errs, p)
