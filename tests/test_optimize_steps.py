"""Time steps optimised for the model (issue 15, item 3): bench/optimize_steps.py.

The DP against brute force, the DDIM step against DPM-Solver-1's exponential form, the coordinate descent against
a problem with a closed-form optimum, the refusal of grids used with another model, NFE or the calibration seeds,
and (slow) the claim itself on the exact gmm: each method's grid lowers the truncation error of DPM-Solver++(3M) at
NFE 6 against the solver's default grid, on seeds disjoint from the calibration set."""
import itertools
import math

import numpy as np
import pytest
import torch

from bench.models.errors import ConfigError
from bench.optimize_steps import (SOURCE_TAG, check_knobs, coordinate_descent, ddim_step, dp_min_path, model_digest,
                                  resolve_grid, split_args, write_artifact)

GMM_CFG = {"name": "gmm", "dim": 4, "n_components": 3, "seed": 0, "schedule": {"name": "vp_linear"}}


# ------------------------------------------------------------------------------------------------ dynamic programming
def _brute(c, n_edges):
    M = c.shape[0]
    best = (math.inf, None)
    for mid in itertools.combinations(range(1, M - 1), n_edges - 1):
        p = (0, *mid, M - 1)
        best = min(best, (sum(c[a, b] for a, b in zip(p, p[1:])), list(p)))
    return best


def test_dp_known_optimum_tiny():
    """5 points, 2 edges: the only cheap route is 0 -> 3 -> 4 (cost 1 + 2); the direct edge is not a 2-edge path."""
    c = np.full((5, 5), 10.0)
    c[0, 4] = 0.1                    # 1 edge: not allowed with n_edges = 2
    c[0, 3], c[3, 4] = 1.0, 2.0
    c[0, 1], c[1, 4] = 0.5, 2.7      # 3.2 > 3.0
    assert dp_min_path(c, 2) == ([0, 3, 4], 3.0)
    assert dp_min_path(c, 1) == ([0, 4], 0.1)


@pytest.mark.parametrize("M,n_edges,seed", [(7, 3, 0), (8, 2, 1), (9, 5, 2), (6, 5, 3)])
def test_dp_matches_brute_force(M, n_edges, seed):
    c = np.random.default_rng(seed).uniform(0.1, 1.0, (M, M))
    path, total = dp_min_path(c, n_edges)
    want, want_path = _brute(c, n_edges)
    assert total == pytest.approx(want, rel=1e-12) and path == want_path
    assert len(path) == n_edges + 1 and path[0] == 0 and path[-1] == M - 1


def test_dp_refuses_impossible_edge_count():
    with pytest.raises(ConfigError, match="1 .. 4 steps"):
        dp_min_path(np.ones((5, 5)), 5)


def test_coordinate_descent_stops_at_a_coordinatewise_minimum():
    """cost(i, j) = (j - i)^2 over 0..M-1: every interior point of the result is the exact minimiser between its
    neighbours (brute force), the total never rises over sweeps, and it lies within 10 % of the DP's optimum (equal
    spacing; coordinate descent on a discrete problem may stop one fine point off it, e.g. 38 against 36 here)."""
    cost = lambda i, j: float((j - i) ** 2)  # noqa: E731
    for M, start in [(13, [0, 1, 2, 3, 12]), (17, [0, 1, 2, 3, 16]), (25, [0, 20, 21, 22, 23, 24])]:
        path, hist = coordinate_descent(cost, start, sweeps=50)
        for k in range(1, len(path) - 1):
            local = [cost(path[k - 1], c) + cost(c, path[k + 1]) for c in range(path[k - 1] + 1, path[k + 1])]
            assert cost(path[k - 1], path[k]) + cost(path[k], path[k + 1]) == min(local)
        assert all(b <= a for a, b in zip(hist, hist[1:])) and hist[-1] < hist[0]
        c = np.array([[cost(i, j) for j in range(M)] for i in range(M)])
        assert hist[-1] <= 1.1 * dp_min_path(c, len(start) - 1)[1]


def test_ddim_step_is_dpm_solver_1(gmm_model):
    """x_s = alpha_s/alpha_t x_t + alpha_s (sigma_hat_s - sigma_hat_t) eps equals DPM-Solver-1's
    alpha_s/alpha_t x_t - sigma_s (e^h - 1) eps with h = lambda_s - lambda_t (Lu et al. 2022, eq. 3.7)."""
    s = gmm_model.schedule
    x, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    t, ts = torch.tensor(0.7, dtype=torch.float64), torch.tensor([0.5, 0.1, 0.01], dtype=torch.float64)
    got = ddim_step(s, x, eps, t, ts)
    for k, tk in enumerate(ts):
        h = s.lambda_(tk) - s.lambda_(t)
        want = s.alpha(tk) / s.alpha(t) * x - s.sigma(tk) * torch.expm1(h) * eps
        assert float((got[k] - want).abs().max()) < 1e-12 * float(want.abs().max())


# ------------------------------------------------------------------------------------------------ knobs and seeds
def test_knobs_checked_before_work():
    with pytest.raises(ConfigError, match="method must be one of gits, lte"):
        check_knobs({"method": "ays"})
    with pytest.raises(ConfigError, match="unknown knob"):
        check_knobs({"n_calibration": 4})
    with pytest.raises(ConfigError, match="n_calib must be an integer >= 2"):
        check_knobs({"n_calib": 1})
    knobs, rest = split_args(["method=lte", "optimize.sweeps=2", "model=gmm", "solver.order=3", "nfe=6"])
    assert knobs == {"method": "lte", "sweeps": 2} and rest == ["model=gmm", "solver.order=3", "nfe=6"]


def _artifact(tmp_path, model_cfg=GMM_CFG, nfe=6, calib_seed=1000, n_calib=64):
    src = {"by": SOURCE_TAG, "method": "gits", "model": model_cfg["name"], "model_cfg_digest": model_digest(model_cfg),
           "solver": "dpm_solver_pp", "nfe": nfe, "steps": nfe, "calib_seed": calib_seed, "n_calib": n_calib}
    art = {"name": "explicit", "t": [1.0, 0.5, 0.2, 0.05, 0.01, 0.001], "sigma_hat": None, "rtol": 1e-6,
           "file": None, "source": src}
    return write_artifact(tmp_path, "g", art)


def _cfg(path, **kw):
    return {"model": dict(GMM_CFG), "nfe": 6, "seed": 0, "n_samples": 100, "solver": {"name": "dpm_solver_pp", "order": 3},
            "timesteps": {"name": "explicit", "t": None, "sigma_hat": None, "rtol": 1e-6, "file": str(path),
                          "source": None}, **kw}


def test_resolve_reads_the_grid_and_its_source(tmp_path):
    path = _artifact(tmp_path)
    ts = resolve_grid(_cfg(path))["timesteps"]
    assert ts["t"] == [1.0, 0.5, 0.2, 0.05, 0.01, 0.001] and ts["file"] is None
    assert ts["source"]["method"] == "gits" and ts["source"]["artifact"] == str(path)
    assert resolve_grid({**_cfg(path), "timesteps": ts})["timesteps"] == ts              # idempotent
    assert resolve_grid(_cfg(path, solver={"name": "heun"}, nfe=11))["timesteps"]["t"] == ts["t"]   # 6 points: allowed


def test_explicit_file_knob_gives_the_inline_grid(tmp_path, gmm_model):
    """timesteps.file (solvers/timesteps.py) reads the list: the same grid as the list given inline; both refused."""
    from bench.solvers.timesteps import fixed_points, make_timesteps
    path = _artifact(tmp_path)
    t = [1.0, 0.5, 0.2, 0.05, 0.01, 0.001]
    got = make_timesteps("explicit", gmm_model.schedule, 6, file=str(path), source={"method": "gits"})
    assert torch.equal(got, make_timesteps("explicit", gmm_model.schedule, 6, t=t))
    assert fixed_points("explicit", file=str(path), t=None, sigma_hat=None) == 6
    with pytest.raises(ConfigError, match="not both"):
        make_timesteps("explicit", gmm_model.schedule, 6, file=str(path), t=t)
    with pytest.raises(ConfigError, match="is not a file"):
        make_timesteps("explicit", gmm_model.schedule, 6, file=str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("change,match", [
    ({"seed": 1000}, "overlap the calibration set"),
    ({"seed": 1000, "n_samples": 1}, "overlap the calibration set"),
    ({"nfe": 8}, "optimised for nfe=6, and this run has nfe=8"),
    ({"solver": {"name": "heun"}, "nfe": 13}, "solver 'heun' takes 7 points at nfe=13"),
    ({"solver": {"name": "heun"}, "nfe": 10}, "solver 'heun' takes 5 points at nfe=10"),
    ({"model": {**GMM_CFG, "seed": 1}}, "optimised for model 'gmm'"),
    ({"model": {**GMM_CFG, "name": "digits"}}, "optimised for model 'gmm'"),
])
def test_resolve_refuses_misuse(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        resolve_grid(_cfg(_artifact(tmp_path), **change))


def test_resolve_refuses_file_and_list(tmp_path):
    cfg = _cfg(_artifact(tmp_path))
    cfg["timesteps"]["t"] = [1.0, 0.001]
    with pytest.raises(ConfigError, match="not both"):
        resolve_grid(cfg)


@pytest.mark.slow
def test_run_refuses_calibration_seed_before_any_work(tmp_path):
    """Through bench.run.run, as `python -m bench run`: refused, nothing recorded."""
    from bench.api import config
    from bench.run import run
    from bench import store

    path = _artifact(tmp_path / "art", model_cfg=config(model="gmm")["model"])
    cfg = config(model="gmm", solver="dpm_solver_pp", nfe=6, seed=1000, n_samples=8, metrics=[],
                 results_dir=str(tmp_path / "res"), timesteps={"name": "explicit", "file": str(path)})
    with pytest.raises(ConfigError, match="overlap"):
        run(cfg)
    assert not store.db_path(str(tmp_path / "res")).exists() or len(store.load_runs(str(tmp_path / "res"))) == 0
    row = run({**cfg, "seed": 0})
    assert row["status"] == "ok"
    ts = row["config"]["timesteps"]
    assert ts["source"]["method"] == "gits" and ts["source"]["artifact"] == str(path)
    assert ts["t"] == [1.0, 0.5, 0.2, 0.05, 0.01, 0.001]


# ------------------------------------------------------------------------------------------------ the claim, on gmm
def _trunc(tmp_path, timesteps, n=512):
    import bench
    out = bench.sample("gmm", "dpm_solver_pp", nfe=6, n_samples=n, seed=0, timesteps=timesteps, dtype="float64",
                       order=3)
    m = bench.compute_metrics(out, ["trunc"], results_dir=str(tmp_path), trunc={"n_samples": n, "profile": False})
    return m["trunc_rms"], m["trunc_rms_se"], out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gits", "lte"])
def test_optimised_grid_lowers_trunc_on_gmm(tmp_path, method):
    """Each method's grid (calibrated on seed 1000) lowers the held-out (seed 0) truncation error of DPM-Solver++(3M)
    at NFE 6 against its default logsnr grid, by more than 2 standard errors of the paired difference (measured: gits
    0.400 against 0.434, 2.9 SE; lte 0.30, over 10 SE; 512 samples)."""
    from bench.__main__ import main
    from bench.metrics.trunc import reference_solve
    from bench.api import load_model

    assert main(["optimize-steps", "model=gmm", "solver=dpm_solver_pp", "solver.order=3", "nfe=6", f"method={method}",
                 f"results_dir={tmp_path}", "name=g"]) == 0
    path = tmp_path / "steps" / "timesteps" / "g.yaml"
    e_def, se_def, out_def = _trunc(tmp_path, "auto")
    e_opt, se_opt, out_opt = _trunc(tmp_path, {"name": "explicit", "file": str(path)})
    assert out_opt.cfg["timesteps"]["source"]["method"] == method
    assert out_opt.cfg["timesteps"]["source"]["calib_seed"] == 1000
    # paired per-sample squared errors against one reference (same x_T: seed 0 in both)
    m = load_model("gmm")
    ref, _ = reference_solve(m.net, m.schedule, out_def.x_T, m.schedule.T, m.schedule.t_min, 1e-10, 1e-10)
    d = ((out_opt.x0 - ref) ** 2).flatten(1).mean(1) - ((out_def.x0 - ref) ** 2).flatten(1).mean(1)
    assert float(d.mean()) < -2 * float(d.std() / math.sqrt(len(d))), (e_opt, se_opt, e_def, se_def)
    assert e_opt < e_def
