"""Sweeps through the command line: killed and rerun, parallel workers (joblib), submitit's local
executor, the end-of-sweep summary, and `bench compare` catching an injected regression."""
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
SWEEP = ["run", "-m", "model=gmm", "solver=euler,heun,midpoint,ralston,rk3,rk4", "nfe=9,17", "n_samples=256", "progress=false"]


def bench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def per_key(results):
    db = Path(results) / "results.sqlite"
    with sqlite3.connect(db) as con:
        return con.execute("SELECT key, COUNT(*), MIN(status) FROM runs GROUP BY key").fetchall()


def n_done(results):
    try:
        return len(per_key(results))
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_killed_sweep_rerun_records_each_cell_exactly_once(tmp_path):
    cmd = [sys.executable, "-m", "bench", *SWEEP, f"results_dir={tmp_path}"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    t0 = time.time()
    while n_done(tmp_path) < 3 and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)            # mid-sweep, possibly mid-write
    p.wait()
    killed_at = n_done(tmp_path)
    assert 3 <= killed_at < 12, "the sweep should have been killed part-way"
    # rerun with two parallel workers: the finished cells are skipped, the rest run, nothing doubles
    r = bench(*SWEEP, f"results_dir={tmp_path}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = per_key(tmp_path)
    assert len(rows) == 12 and all(n == 1 and st == "ok" for _, n, st in rows)
    done, skipped = map(int, re.search(r"sweep summary: 12 cells: (\d+) done, (\d+) skipped", r.stdout).groups())
    assert skipped >= killed_at and done + skipped == 12
    with sqlite3.connect(tmp_path / "results.sqlite") as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.slow
def test_parallel_workers_racing_on_one_cell_record_it_once(tmp_path):
    r = bench("run", "-m", "model=gmm", "solver=euler", "nfe=8", "seed=0,0,0", "n_samples=64", "metrics=[]",
              f"results_dir={tmp_path}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [n for _, n, _ in per_key(tmp_path)] == [1]
    assert "3 cells: 1 done, 2 skipped, 0 failed" in r.stdout


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    r = bench("run", "-m", "model=gmm", "solver=euler,heun", "nfe=8", "n_samples=16", "metrics=[]", f"results_dir={tmp_path}",
              "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 cells: 2 done" in r.stdout
    with sqlite3.connect(tmp_path / "results.sqlite") as con:
        got = sorted(con.execute("SELECT solver, nfe FROM runs WHERE status='ok'").fetchall())
    assert got == [("euler", 8), ("heun", 7)]


@pytest.mark.slow
def test_sweep_goes_on_past_invalid_and_summarises(tmp_path):
    r = bench("run", "-m", "model=gmm", "solver=euler,rk4", "nfe=3", "n_samples=8", "metrics=[]", f"results_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 cells: 1 done, 0 skipped, 0 failed, 1 invalid" in r.stdout
    assert "invalid: model=gmm solver=rk4" in r.stdout and "cannot meet an NFE budget of 3" in r.stdout


@pytest.mark.slow
def test_compare_catches_an_injected_regression(tmp_path):
    cur, base = tmp_path / "cur", tmp_path / "base.csv"
    r = bench("run", "-m", "model=gmm", "solver=euler,heun", "nfe=9", "n_samples=16", f"results_dir={cur}", "progress=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert bench("export", "--results-dir", str(cur), "--format", "csv", "--out", str(tmp_path / "base")).returncode == 0
    ok = bench("compare", "--baseline", str(base), "--results-dir", str(cur))
    assert ok.returncode == 0 and "compared 2 cells" in ok.stdout and "no regression" in ok.stdout
    # inject: heun's error doubles in the current results
    with sqlite3.connect(cur / "results.sqlite") as con:
        (rid, m), = con.execute("SELECT id, metrics FROM runs WHERE solver='heun'").fetchall()
        m = json.loads(m)
        m["trunc_rms"] *= 2.0
        con.execute("UPDATE runs SET metrics=? WHERE id=?", (json.dumps(m), rid))
    bad = bench("compare", "--baseline", str(base), "--results-dir", str(cur))
    assert bad.returncode == 1
    assert "REGRESSION gmm heun nfe=9" in bad.stdout and "trunc_rms" in bad.stdout and "x2.00" in bad.stdout
    assert "euler" not in bad.stdout.split("REGRESSION", 1)[1]
    assert bench("compare", "--baseline", str(base), "--results-dir", str(cur), "--tol-err", "2.5").returncode == 0


def test_committed_baseline_matches_its_sweep_definition():
    """results/baseline/<model>.csv holds one finished row per cell of conf/baseline.yaml's sweep."""
    import pandas as pd
    from bench.compare import baseline_sweeps
    for model, overrides in baseline_sweeps().items():
        df = pd.read_csv(ROOT / "results" / "baseline" / f"{model}.csv")
        n = 1
        for o in overrides:
            k, v = o.split("=", 1)
            if k in ("solver", "nfe", "seed", "timesteps"):
                n *= len(v.split(","))
        assert len(df) == n and df["cell"].is_unique and set(df["status"]) == {"ok"}
