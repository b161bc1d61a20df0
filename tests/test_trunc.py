import math

import pytest
import torch

import bench.solvers.all  # noqa: F401  (registers every solver, for the parametrisation below)
from bench.metrics import cache, make_metric
from bench.metrics.trunc import fit_order, local_error_profile, reference_trajectory, strong_error
from metric_helpers import make_ctx
from bench.models.dynamics import Dynamics, _bc
from bench.solvers.brownian import BrownianRNG, refine_grid
from bench.solvers.registry import SOLVERS, get_solver
from bench.solvers.rng import PerSampleRNG
from bench.solvers.timesteps import make_timesteps


def test_fit_order_recovers_a_known_power_law():
    nfes = [10, 20, 40, 80]
    p, c = fit_order(nfes, [3.0 * n ** -2.0 * (1 + 0.01 * (-1) ** i) for i, n in enumerate(nfes)])
    assert p == pytest.approx(2.0, abs=0.02) and math.exp(c) == pytest.approx(3.0, rel=0.05)
    with pytest.raises(ValueError):
        fit_order([10, 10], [1.0, 2.0])


def _trunc_row(model, solver, nfe, tmp_path, n=64, **knobs):
    spec = get_solver(solver)
    t = make_timesteps("edm", model.schedule, spec.steps_for(nfe))
    rng = PerSampleRNG(0, range(n))
    x_T = rng.randn(model.shape) * model.schedule.prior_std()
    with torch.inference_mode():
        samples = spec.fn(Dynamics(model.net, model.schedule), x_T, t, rng)
    ctx = make_ctx(model, samples, tmp_path, solver=solver, t=t, x_T=x_T, cfg_model={"name": "gmm"})
    m = make_metric("trunc", {"n_samples": n, **knobs})
    return m.compute(ctx), m.protocol(ctx), t


def test_sweep_order_and_reference_cache(gmm_model, tmp_path):
    before = cache.computed["trunc_ref"]
    for solver, order in (("euler", 1.0), ("heun", 2.0)):
        nfes, errs = [], []
        for nfe in (20, 40, 80):
            out, proto, _ = _trunc_row(gmm_model, solver, nfe, tmp_path, profile=False)
            nfes.append(nfe)
            errs.append(out["trunc_rms"])
        assert fit_order(nfes, errs)[0] == pytest.approx(order, abs=0.3)
    # one float64 reference for the whole sweep: same x_T, same t range, same tolerances
    assert cache.computed["trunc_ref"] == before + 1
    assert proto["n_samples"] == 64 and proto["sample_indices"] == "0..63"


@pytest.mark.slow
def test_local_error_profile_has_local_order_p_plus_1(gmm_model, tmp_path):
    sch = gmm_model.schedule
    x_T = PerSampleRNG(0, range(8)).randn((4,), dtype=torch.float64) * sch.prior_std()
    for solver, local_order in (("euler", 2), ("heun", 3)):
        spec = get_solver(solver)
        worst = []
        for steps in (11, 21):
            t = make_timesteps("uniform_t", sch, steps)   # halving every step of a uniform grid
            traj, _ = reference_trajectory(gmm_model.net, sch, x_T, t, 1e-9, 1e-9)
            prof = local_error_profile(gmm_model, spec, {}, t, x_T, traj, torch.float64)
            assert len(prof) == steps - 1 and all(e > 0 for e in prof)
            worst.append(max(prof[: (steps - 1) // 2]))     # the first half of [t_min, T]: smooth part
        assert worst[0] / worst[1] == pytest.approx(2 ** local_order, rel=0.35)


def test_profile_is_recorded_as_a_list(gmm_model, tmp_path):
    out, proto, t = _trunc_row(gmm_model, "heun", 18, tmp_path, n=32, profile_samples=8)
    assert isinstance(out["trunc_local_profile"], list) and len(out["trunc_local_profile"]) == len(t) - 1
    assert proto["profile_samples"] == 8


# --- Brownian coupling and strong error ---------------------------------------------------------

def test_brownian_increments_are_path_consistent_and_normalised():
    t = torch.tensor([1.0, 0.6, 0.3, 0.1], dtype=torch.float64)
    fine = refine_grid(t, 4)
    assert all(any(abs(float(f) - float(c)) < 1e-15 for f in fine) for c in t)
    rng = BrownianRNG(7, range(3000), fine, dtype=torch.float64)
    x = torch.zeros(3000, 1, dtype=torch.float64)
    coarse = rng.increment(x, t[0], t[1]) * math.sqrt(0.4)
    parts = sum(rng.increment(x, fine[k], fine[k + 1]) * math.sqrt(abs(float(fine[k + 1] - fine[k])))
                for k in range(4))
    assert torch.allclose(coarse, parts, atol=1e-12)               # coarse increment = sum of fine ones
    z = rng.increment(x, t[1], t[3])
    assert float(z.var()) == pytest.approx(1.0, abs=4 * math.sqrt(2 / 3000))
    assert abs(float((z * rng.increment(x, t[0], t[1])).mean())) < 4 / math.sqrt(3000)   # disjoint: independent
    # the same sample's path whatever the batch it is in
    part = BrownianRNG(7, range(10, 12), fine, dtype=torch.float64).increment(x[:2], t[0], t[1])
    assert torch.equal(part, rng.increment(x, t[0], t[1])[10:12])
    with pytest.raises(ValueError):
        rng.increment(x, 0.55, 0.3)                               # not on the fine grid


def euler_maruyama(dyn, x, t, rng, **_):
    """Reverse-SDE Euler-Maruyama (Song et al. 2021, eq. 6) with all noise from rng.increment; final denoise."""
    for n in range(len(t) - 1):
        h = t[n + 1] - t[n]
        z = rng.increment(x, t[n], t[n + 1])
        x = x + dyn.sde_drift(t[n], x) * _bc(h, x) + _bc(dyn.diffusion(t[n]) * h.abs().sqrt(), x) * z
    return dyn.x0(x, t[-1])


def _strong_errors(model, fn, steps_list, n=64):
    x_T = PerSampleRNG(0, range(n)).randn(model.shape, dtype=torch.float64) * model.schedule.prior_std()
    return [strong_error(fn, model, x_T, make_timesteps("uniform_t", model.schedule, s), 0, range(n), 4)[0]
            for s in steps_list]


@pytest.mark.slow
def test_strong_error_of_brownian_euler_maruyama_shrinks(gmm_model):
    errs = _strong_errors(gmm_model, euler_maruyama, (20, 40, 80))
    assert errs[0] > 1.4 * errs[1] > 1.4 ** 2 * errs[2]


BROWNIAN = [s for s in sorted(SOLVERS) if SOLVERS[s].brownian] or [None]


@pytest.mark.slow
@pytest.mark.parametrize("name", BROWNIAN)
def test_strong_error_of_registered_brownian_solvers_shrinks(gmm_model, name):
    if name is None:
        pytest.skip("no solver with spec.brownian is registered")
    errs = _strong_errors(gmm_model, get_solver(name).fn, (20, 40, 80))
    assert errs[0] > 1.2 * errs[1] > 1.2 ** 2 * errs[2]


def test_non_brownian_stochastic_solver_is_marked_not_applicable(gmm_model, tmp_path):
    from dataclasses import replace
    spec = replace(get_solver("euler"), name="fake_sde", stochastic=True, brownian=False)
    ctx = make_ctx(gmm_model, torch.zeros(4, 4), tmp_path)
    ctx.spec = spec
    out = make_metric("trunc", {}).compute(ctx)
    assert out["trunc_rms"] is None and out["trunc_note"].startswith("n/a:")
