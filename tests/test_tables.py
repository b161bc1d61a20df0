"""Tables a paper can cite (issue 11): declared columns, one row per table cell, an uncertainty on every number,
and compare alarms that need both the tolerance and statistical significance."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from bench import report as rep
from bench import store
from bench.compare import regressions
from bench.metrics.columns import all_columns
from tests.test_faults import run_cli


def _row(key, solver, nfe, seed, n, trunc, se, model="m", protocol=None, status="ok", **extra):
    return {"key": key, "cell": key, "status": status, "model": model, "solver": solver, "solver_knobs": {},
            "timesteps": "edm", "nfe_budget": nfe, "nfe": nfe, "seed": seed, "n_samples": n, "dtype": "float32",
            "metrics": {"trunc_rms": trunc, "trunc_rms_se": se, **extra}, "code_version": "x",
            "protocols": {"trunc": protocol or {"metric": "trunc", "rtol": 1e-5}}}


def test_every_column_a_run_writes_is_declared(tmp_path):
    rc, out, err = run_cli("run", "model=gmm", "n_samples=32", "metrics=[trunc,fid,nll]", "metric_cfg.nll.n_points=8",
                           "metric_cfg.trunc.n_samples=16", f"results_dir={tmp_path}", "progress=false")
    assert rc == 0, err
    written = set(json.loads(store.load_runs(tmp_path).iloc[0]["metrics"]))
    declared = all_columns()
    assert written <= set(declared), written - set(declared)
    for c in declared.values():
        if c.quality:
            assert c.better in ("lower", "higher") and c.se in declared and c.change and c.tol
    row = json.loads(store.load_runs(tmp_path).iloc[0]["metrics"])
    assert row["trunc_rms_se"] > 0 and row["fid_se"] > 0 and row["nll_bpd_se"] > 0


def test_report_keeps_sample_counts_apart_and_aggregates_seeds(tmp_path):
    rows = [_row("a0", "euler", 10, 0, 64, 0.30, 0.01), _row("a1", "euler", 10, 1, 64, 0.34, 0.01),
            _row("a2", "euler", 20, 0, 64, 0.15, 0.005), _row("a3", "euler", 20, 1, 64, 0.17, 0.005),
            _row("b0", "euler", 10, 0, 256, 0.31, 0.004), _row("b1", "euler", 20, 0, 256, 0.16, 0.002),
            _row("c0", "euler", 10, 0, 64, 9.0, 0.1, protocol={"metric": "trunc", "rtol": 1e-3})]
    for r in rows:
        store.record(tmp_path, r)
    store.record(tmp_path, {**_row("a0", "euler", 10, 0, 64, 0.30, 0.01), "key": "a0-new", "code_version": "y"})
    rep.report(tmp_path)
    d = tmp_path / "report" / "m"
    tables = sorted(d.glob("trunc_rms*.csv"))
    assert len(tables) == 3                                 # n=64, n=256 and the other protocol, never mixed
    by_n = {}
    md = (d / "report.md").read_text()
    for t in tables:
        df = pd.read_csv(t).set_index("nfe_budget")
        by_n[(tuple(df["seeds"]), round(df.loc[10, "value"], 6))] = df
    two = next(df for (seeds, _), df in by_n.items() if seeds == (2, 2))
    assert two.loc[10, "value"] == pytest.approx(0.32)                        # mean over the two seeds
    assert two.loc[10, "se"] == pytest.approx(np.std([0.30, 0.34], ddof=1) / math.sqrt(2))
    one = next(df for (seeds, v), df in by_n.items() if seeds == (1, 1) and v == 0.31)
    assert one.loc[10, "se"] == pytest.approx(0.004)                          # one seed: its own standard error
    assert "n = 64 samples" in md and "n = 256 samples" in md and "(2 seeds)" in md and "seeds 0, 1" in md
    assert "9 ± 0.1" in md                                                    # the other protocol: its own table


def test_fid_floor_only_at_the_matching_sample_count():
    fid = all_columns()["fid"]
    g = pd.DataFrame({"fid": [20.0, 21.0], "fid_real_test": [17.9, 17.9], "fid_real_test_n": [359, 359]})
    assert rep.floor_of(g, fid, 1000) is None                 # measured at 359, not at the table's 1000
    v, label = rep.floor_of(g, fid, 359)
    assert v == 17.9 and "held-out real data" in label and "n = 359" in label
    exact = pd.DataFrame({"fid": [0.2], "fid_exact_samples": [0.004]})   # gmm: exact samples at the row's own count
    assert rep.floor_of(exact, fid, 256)[0] == 0.004


def test_order_range_and_pre_asymptotic_flag():
    a = pd.DataFrame({"solver": ["s"] * 4, "nfe": [5, 10, 20, 40], "value": [1.0, 0.9, 0.25, 0.0625]})
    o = rep.order_fit(a)["s"]
    assert o["pre_asymptotic"] and o["range"] == (5, 40)
    o = rep.order_fit(a, (10, 40))["s"]
    assert o["order"] == pytest.approx(2.0, abs=0.2) and not o["pre_asymptotic"] and o["range"] == (10, 40)


# ---- compare --------------------------------------------------------------------------------------------------
def _frame(**metrics):
    return pd.DataFrame([{"id": 1, "cell": "c", "status": "ok", "model": "m", "solver": "s", "nfe_budget": 10,
                          "seed": 0, "n_samples": 8, **metrics}])


def test_injected_regression_is_caught_and_noise_is_not():
    # trunc doubled, standard errors small: a regression
    out, n = regressions(_frame(trunc_rms=0.020, trunc_rms_se=0.0005), _frame(trunc_rms=0.010, trunc_rms_se=0.0005))
    assert n == 1 and [o[1] for o in out] == ["trunc_rms"] and "z =" in out[0][4]
    # FID +15 % (over the 10 % tolerance) but within 1 standard error: noise, not a regression
    details = []
    out, _ = regressions(_frame(fid=11.5, fid_se=1.5), _frame(fid=10.0, fid_se=1.5), details=details)
    assert not out and details[0]["verdict"] == "worse, within noise"
    # the same +15 % with tight errors is one
    out, _ = regressions(_frame(fid=11.5, fid_se=0.1), _frame(fid=10.0, fid_se=0.1))
    assert [o[1] for o in out] == ["fid"]
    # an improvement is never a regression, however significant
    out, _ = regressions(_frame(trunc_rms=0.001, trunc_rms_se=1e-6), _frame(trunc_rms=0.01, trunc_rms_se=1e-6))
    assert not out


def test_bookkeeping_is_never_compared():
    details = []
    out, _ = regressions(_frame(nll_nfe=320, fid_n_ref=500, fid_real_test_n=10, nll_bpd_se=0.5, trunc_ref_nfe=999,
                                fid_real_test=99.0),
                         _frame(nll_nfe=302, fid_n_ref=1000, fid_real_test_n=359, nll_bpd_se=0.01, trunc_ref_nfe=100,
                                fid_real_test=17.0), details=details)
    assert not out and not details


def test_compare_with_no_matching_cell_fails_unless_allowed(tmp_path):
    base = tmp_path / "base.csv"
    _frame(trunc_rms=0.01).assign(cell="other").to_csv(base, index=False)
    (tmp_path / "r").mkdir()
    store.open_store(tmp_path / "r")
    rc, out, err = run_cli("compare", f"baseline={base}", f"results_dir={tmp_path / 'r'}")
    assert rc == 1 and "no cell in common" in err
    rc, out, err = run_cli("compare", f"baseline={base}", f"results_dir={tmp_path / 'r'}", "allow_no_match=true")
    assert rc == 0


def test_compare_prints_what_it_compared(tmp_path):
    res = tmp_path / "r"
    rc, *_ = run_cli("run", "model=gmm", "n_samples=32", "metrics=[trunc]", "metric_cfg.trunc.n_samples=32",
                     f"results_dir={res}", "progress=false")
    assert rc == 0
    store.export(res, tmp_path / "base.csv")
    rc, out, err = run_cli("compare", f"baseline={tmp_path / 'base.csv'}", f"results_dir={res}")
    assert rc == 0 and "trunc_rms" in out and " ok" in out and "no regression" in out
    assert "trunc_ref_nfe" not in out                       # bookkeeping is not in the table


@pytest.mark.parametrize("shift,lo,hi", [(0.15, 0.7, 1.35), (0.4, 0.7, 1.35), (0.0, 1.0, 2.5)])
def test_fid_bootstrap_se_against_the_spread_over_seeds(gmm_model, shift, lo, hi):
    """Bootstrap standard error of one row's FID against the sd of FID over 50 independent sample sets.  With a real
    error (samples scaled and shifted by `shift`) it matches (measured ratio 0.90-0.97); at the estimator's floor
    (exact samples) FID is bias-dominated and the bootstrap overstates its spread (ratio 1.55): conservative."""
    from bench.metrics.fid import bootstrap_se, frechet_distance, moments
    mu, cov = gmm_model.data.mean(), gmm_model.data.cov()
    fids, ses = [], []
    for s in range(50):
        x = gmm_model.data.sample(400, generator=torch.Generator().manual_seed(s)) * (1 + shift) + shift
        fids.append(frechet_distance(*moments(x), mu, cov))
        if s < 8:
            ses.append(bootstrap_se(x, mu, cov, 100, s))
    ratio = float(np.mean(ses)) / float(np.std(fids, ddof=1))
    assert lo < ratio < hi, ratio


@pytest.mark.slow
def test_trunc_se_against_the_spread_over_seeds(gmm_model):
    """The delta-method standard error of trunc_rms (one row, over its samples) against the sd of trunc_rms over
    20 seeds (independent x_T sets) for heun at NFE 9 on gmm."""
    from bench.metrics.trunc import reference_solve, rms_se
    from bench.orders import solve
    from bench.solvers.rng import PerSampleRNG
    vals, ses = [], []
    for seed in range(20):
        x_T = PerSampleRNG(seed, range(64), dtype=torch.float64).randn(gmm_model.shape)
        x0, _, _ = solve(gmm_model, "heun", 9, x_T)
        ref, _ = reference_solve(gmm_model.net, gmm_model.schedule, x_T, gmm_model.schedule.T,
                                 gmm_model.schedule.t_min, rtol=1e-8, atol=1e-8)
        v, se = rms_se(x0, ref)
        vals.append(v)
        ses.append(se)
    ratio = float(np.mean(ses)) / float(np.std(vals, ddof=1))
    assert 0.6 < ratio < 1.6, ratio


def test_report_labels_name_an_optimised_grid(tmp_path):
    src = {"by": "bench optimize-steps", "method": "gits", "nfe": 6, "calib_seed": 1000}
    store.record(tmp_path, {**_row("a", "euler", 6, 0, 64, 0.3, 0.01), "timesteps": "explicit",
                            "config": {"timesteps": {"name": "explicit", "t": [1.0, 0.5, 0.001], "source": src}}})
    store.record(tmp_path, {**_row("b", "euler", 6, 0, 64, 0.4, 0.01), "timesteps": "explicit",
                            "config": {"timesteps": {"name": "explicit", "t": [1.0, 0.4, 0.001]}}})
    store.record(tmp_path, _row("c", "euler", 6, 0, 64, 0.5, 0.01))
    labels = sorted(rep.newest_per_cell(store.load_runs(tmp_path))["label"])
    assert labels == ["euler [edm]", "euler [explicit: gits-optimised for nfe=6, calibration seed 1000]",
                      "euler [explicit]"]
