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
    # the references of a sweep are shared: same x_T, same t range, same tolerance rungs; a rerun solves none
    used = cache.computed["trunc_ref"] - before
    assert 2 <= used <= 2 * 7                      # a full and a check solve per tolerance rung at most
    for nfe in (20, 40, 80):
        _trunc_row(gmm_model, "heun", nfe, tmp_path, profile=False)
    assert cache.computed["trunc_ref"] - before == used
    assert proto["n_samples"] == 64 and proto["sample_indices"] == "0..63"


def _ref_x0(model, x_T, t, tol=1e-11):
    from bench.metrics.trunc import reference_solve
    return reference_solve(model.net, model.schedule, x_T, t[0], t[-1], tol, tol)[0]


@pytest.mark.parametrize("solver,nfe", [("heun", 41), ("rk4", 81)])
def test_reference_error_is_measured_and_kept_below_a_tenth(gmm_model, tmp_path, solver, nfe):
    """Started at a loose rtol = 1e-3, trunc tightens its reference until the measured reference error is <= 0.1 of
    the value; the value then agrees with the error against an independent 1e-11 reference to that accuracy, and
    trunc_ref_err estimates the chosen reference's true error (against 1e-11) within a factor 1.5."""
    from bench.metrics.trunc import rms
    out, proto, t = _trunc_row(gmm_model, solver, nfe, tmp_path, n=32, rtol=1e-3, atol=1e-3, check_samples=16)
    assert out["trunc_ref_rtol"] < 1e-3 and not out["trunc_ref_limited"]
    assert out["trunc_ref_err"] <= 0.1 * out["trunc_rms"]
    rng = PerSampleRNG(0, range(32))
    x_T = rng.randn(gmm_model.shape) * gmm_model.schedule.prior_std()
    spec = get_solver(solver)
    with torch.inference_mode():
        x = spec.fn(Dynamics(gmm_model.net, gmm_model.schedule), x_T, t, rng)
        exact = _ref_x0(gmm_model, x_T.double(), t)
        chosen = _ref_x0(gmm_model, x_T[:16].double(), t, out["trunc_ref_rtol"])
    true_err = rms(x, exact)
    assert abs(out["trunc_rms"] - true_err) <= 0.1 * true_err + 1e-12
    true_ref_err = rms(chosen, exact[:16])
    assert true_ref_err / 1.5 <= out["trunc_ref_err"] <= 1.5 * true_ref_err
    # the per-sample spread, against the same independent reference
    r = ((x.double() - exact) ** 2).flatten(1).mean(1).sqrt()
    assert out["trunc_median"] == pytest.approx(float(r.median()), rel=0.1)
    assert out["trunc_worst"] == pytest.approx(float(r.max()), rel=0.1)
    assert float(r[out["trunc_worst_index"]]) >= 0.9 * float(r.max())
    assert out["trunc_median"] <= out["trunc_rms"] <= out["trunc_worst"]
    assert proto["rtol"] == 1e-3 and proto["ref_fraction"] == 0.1     # the policy, not the rung, is the protocol


def test_reference_at_min_rtol_flags_the_value_as_limited(gmm_model, tmp_path):
    out, _, _ = _trunc_row(gmm_model, "rk4", 161, tmp_path, n=16, rtol=1e-3, atol=1e-3, min_rtol=1e-3)
    assert out["trunc_ref_rtol"] == 1e-3 and out["trunc_ref_limited"] is True
    assert out["trunc_ref_err"] > 0.1 * out["trunc_rms"] and "limited by the reference" in out["trunc_note"]


@pytest.mark.parametrize("knobs,msg", [({"min_rtol": 1e-3, "rtol": 1e-5}, "min_rtol"),
                                       ({"check_samples": 0}, "check_samples"),
                                       ({"ref_fraction": 1.5}, "ref_fraction"),
                                       ({"ref_fraction": True}, "ref_fraction")])
def test_bad_reference_knobs_are_config_errors(knobs, msg):
    from bench.models.errors import ConfigError
    with pytest.raises(ConfigError, match=msg):
        make_metric("trunc", knobs)


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


def _strong_errors(model, fn, steps_list, n=256):
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


def test_rms_standard_error_agrees_with_the_jackknife():
    """trunc_rms_se (delta method) against an independent estimator, the jackknife of sqrt(mean e) over samples:
    they agree to O(1/n), here within 0.3 %, so a wrong factor in the delta method (even 1 %) is caught."""
    from bench.metrics.trunc import rms_se
    g = torch.Generator().manual_seed(5)
    a = torch.randn(20000, 3, dtype=torch.float64, generator=g) * torch.rand(20000, 1, dtype=torch.float64, generator=g)
    b = torch.zeros_like(a)
    r, se = rms_se(a, b)
    e = (a ** 2).mean(1)
    n = e.numel()
    theta = torch.sqrt((e.sum() - e) / (n - 1))                    # leave-one-out RMS
    se_jack = float(torch.sqrt((n - 1) / n * ((theta - theta.mean()) ** 2).sum()))
    assert r == pytest.approx(float(torch.sqrt(e.mean())), rel=1e-14)
    assert se == pytest.approx(se_jack, rel=3e-3)


def test_per_sample_tail_columns():
    """trunc_median, trunc_worst and trunc_worst_index from per-sample errors set by construction: sample i differs
    from the reference by c_i in every dimension, so its RMS error per dimension is |c_i|."""
    from bench.metrics.trunc import rms_se, rms_tail
    c = torch.tensor([0.1, -0.3, 0.2, 5.0, 0.4], dtype=torch.float64)
    b = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = b + c.reshape(5, 1, 1)
    tail = rms_tail(a.float(), b.float())
    assert tail["trunc_median"] == pytest.approx(0.3, rel=1e-6)
    assert tail["trunc_worst"] == pytest.approx(5.0, rel=1e-6) and tail["trunc_worst_index"] == 3
    assert rms_se(a, b)[0] == pytest.approx(float((c ** 2).mean().sqrt()), rel=1e-12)   # one sample carries the rms
