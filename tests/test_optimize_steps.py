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


# ------------------------------------------------------------------------------------------------ the teacher cache
def _gmm_cfg(tmp_path, nfe=6, **model):
    from bench.api import config
    cfg = config(model="gmm", solver={"name": "dpm_solver_pp", "order": 3}, nfe=nfe, results_dir=str(tmp_path))
    cfg["model"].update(model)
    return cfg


SMALL = {"n_calib": 8, "fine_points": 25}


def test_teacher_cache_reused_across_budgets_same_grid(tmp_path, monkeypatch):
    """Two searches (NFE 6, then 4) with a fixed fine grid: the teacher is solved once (cache misses 1, and the
    network is called only during the first search), and each grid equals the one found without the cache."""
    from bench.metrics import cache
    from bench.models import dynamics
    from bench.optimize_steps import optimize

    calls = []
    orig = dynamics.Dynamics.eps
    monkeypatch.setattr(dynamics.Dynamics, "eps",
                        lambda self, x, t, *a, **kw: calls.append(1) or orig(self, x, t, *a, **kw))
    before = cache.computed["gits_teacher"]
    first = optimize(_gmm_cfg(tmp_path, 6), SMALL)
    n_first = len(calls)
    second = optimize(_gmm_cfg(tmp_path, 4), SMALL)
    assert cache.computed["gits_teacher"] - before == 1
    assert n_first == first["source"]["search_nfe"] > 0 and len(calls) == n_first     # no evaluation on a hit
    assert not first["source"]["teacher"]["cached"] and second["source"]["teacher"]["cached"]
    assert second["source"]["network_evals_this_search"] == 0 and second["source"]["search_nfe"] == n_first
    for art, nfe in ((first, 6), (second, 4)):
        fresh = optimize(_gmm_cfg(tmp_path / "nocache", nfe), {**SMALL, "teacher_cache": False})
        assert art["t"] == fresh["t"] and len(art["t"]) == nfe
        assert art["source"]["objective_value"] == fresh["source"]["objective_value"]
    assert not (tmp_path / "nocache" / "cache").exists()


class _Plant:
    def __reduce__(self):
        import os
        return (os.mkdir, (os.environ["BENCH_TEST_PLANT_MARK"],))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["pickle", "garbage", "wrong_shapes"])
def test_planted_or_corrupt_teacher_entry_is_recomputed(tmp_path, monkeypatch, kind):
    """A file at the entry's path that needs pickle (its code would create a directory), is not a torch file, or
    holds the right key with data of other shapes: never unpickled, recomputed, same grid as a clean search."""
    import pickle

    from bench.metrics import cache
    from bench.optimize_steps import TEACHER_KIND, optimize

    clean = optimize(_gmm_cfg(tmp_path / "clean"), SMALL)
    (entry,) = (tmp_path / "clean" / "cache" / TEACHER_KIND).glob("*.pt")
    path = tmp_path / "r" / "cache" / TEACHER_KIND / entry.name
    path.parent.mkdir(parents=True)
    mark = tmp_path / "planted-code-ran"
    monkeypatch.setenv("BENCH_TEST_PLANT_MARK", str(mark))
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"key": None, "value": _Plant()}))
    elif kind == "garbage":
        path.write_bytes(b"\x00not a torch file" * 10)
    else:
        good = torch.load(entry, weights_only=True)
        good["value"]["x"] = good["value"]["x"][:3]
        torch.save(good, path)
    before = cache.computed[TEACHER_KIND]
    art = optimize(_gmm_cfg(tmp_path / "r"), SMALL)
    assert not mark.exists()
    assert cache.computed[TEACHER_KIND] - before == 1 and not art["source"]["teacher"]["cached"]
    assert art["t"] == clean["t"]
    again = optimize(_gmm_cfg(tmp_path / "r"), SMALL)          # the rewritten entry is now a hit
    assert again["source"]["teacher"]["cached"] and again["t"] == clean["t"]


def test_teacher_key_changes_with_model_seed_and_grid(gmm_model):
    from bench.metrics.cache import key_hash
    from bench.optimize_steps import teacher_key

    k = check_knobs({})
    x_T = torch.randn(4, 4, dtype=torch.float64)
    t = torch.linspace(1.0, 1e-3, 9, dtype=torch.float64)
    base = key_hash(teacher_key(GMM_CFG, gmm_model, x_T, t, k))
    assert base == key_hash(teacher_key(dict(GMM_CFG), gmm_model, x_T.clone(), t.clone(), dict(k)))
    others = [teacher_key({**GMM_CFG, "seed": 1}, gmm_model, x_T, t, k),
              teacher_key({**GMM_CFG, "schedule": {"name": "vp_cosine"}}, gmm_model, x_T, t, k),
              teacher_key(GMM_CFG, gmm_model, x_T, t, {**k, "calib_seed": 1001}),
              teacher_key(GMM_CFG, gmm_model, x_T, t, {**k, "n_calib": 65}),
              teacher_key(GMM_CFG, gmm_model, x_T, t, {**k, "teacher_rtol": 1e-6}),
              teacher_key(GMM_CFG, gmm_model, x_T + 1e-12, t, k),
              teacher_key(GMM_CFG, gmm_model, x_T, torch.linspace(1.0, 1e-3, 10, dtype=torch.float64), k),
              teacher_key(GMM_CFG, gmm_model, x_T, t * (1 - 1e-12), k)]
    hashes = [key_hash(o) for o in others]
    assert base not in hashes and len(set(hashes)) == len(hashes)


def test_fine_points_and_budget_knobs_checked(tmp_path):
    from bench.optimize_steps import main, nfe_budgets, optimize

    with pytest.raises(ConfigError, match="fine_points must be an integer >= 2 or null"):
        check_knobs({"fine_points": 1})
    with pytest.raises(ConfigError, match="teacher_cache must be true or false"):
        check_knobs({"teacher_cache": "yes"})
    with pytest.raises(ConfigError, match="fine_points=5 is fewer than the 6 points"):
        optimize(_gmm_cfg(tmp_path, 6), {"fine_points": 5})
    assert nfe_budgets(["model=gmm", "nfe=4,5, 20"]) == ["4", "5", "20"] and nfe_budgets(["model=gmm"]) == [""]
    with pytest.raises(ConfigError, match="comma-separated list"):
        nfe_budgets(["nfe=4,x"])
    with pytest.raises(ConfigError, match="names one artifact"):
        main(["model=gmm", "solver=euler", "nfe=4,5", "name=g", f"results_dir={tmp_path}"])
    assert not (tmp_path / "cache").exists()


def test_orderings_markdown_marks_the_best_of_each_grid_kind():
    """bench.orderings.markdown: 'preferred / optimised (counted NFE)', the smallest of each kind per model and NFE in
    bold, and one cost row per distinct teacher (model, spacing, fine points) counting the grids found from it."""
    from bench.orderings import markdown
    src = lambda sp, cached: {"fine_timesteps": sp, "fine_points": 241, "search_wall_time_s": 0.01,  # noqa: E731
                              "teacher": {"nfe": 350, "eps_nfe": 240, "wall_time_s": 114.5, "cached": cached}}
    cells = [{"model": "digits", "label": "A", "nfe": 4, "pref": {"trunc_rms": 0.5}, "opt": {"trunc_rms": 0.2, "nfe": 4},
              "search": src("edm", False)},
             {"model": "digits", "label": "B", "nfe": 4, "pref": {"trunc_rms": 0.4}, "opt": {"trunc_rms": 150.2, "nfe": 3},
              "search": src("edm", True)},
             {"model": "digits", "label": "C", "nfe": 4, "pref": {"trunc_rms": None}, "opt": {"trunc_rms": 0.3, "nfe": 4},
              "search": src("logsnr", False)}]
    lines = markdown(cells).splitlines()
    assert lines[2] == "| digits | A | 0.5 / **0.2** (4) |"
    assert lines[3] == "| digits | B | **0.4** / 150 (3) |"
    assert lines[4] == "| digits | C | - / 0.3 (4) |"
    assert "| digits | edm, 241 | 350 + 240 | 114.5 s | 2 | 0.01 s |" in lines
    assert "| digits | logsnr, 241 | 350 + 240 | 114.5 s | 1 | - |" in lines
