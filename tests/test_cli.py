import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def rows(results):
    db = Path(results) / "results.sqlite"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        return con.execute("SELECT solver, nfe_budget, nfe, steps, metrics, status FROM runs").fetchall()


def test_main_command_records_a_row(tmp_path):
    r = bench("run", "model=gmm", "solver=heun", "nfe=18", "n_samples=64", f"results_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "trunc_rms" in r.stdout and "18 / 17" in r.stdout
    (row,) = rows(tmp_path)
    assert row[:4] == ("heun", 18, 17, 9)
    assert '"trunc_rms"' in row[4] and row[5] == "ok"


@pytest.mark.slow
def test_multirun_records_each_cell(tmp_path):
    r = bench("run", "-m", "model=gmm", "solver=euler,heun", "nfe=10,20", "n_samples=32", f"results_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    got = sorted((s, b, n) for s, b, n, *_ in rows(tmp_path))
    assert got == [("euler", 10, 10), ("euler", 20, 20), ("heun", 10, 9), ("heun", 20, 19)]


_SLOW = pytest.mark.slow        # one subprocess each (~3 s); the same errors are tested in process elsewhere


@pytest.mark.parametrize("args,needle", [
    (["solver=nope"], "Valid solver names are: ab, ancestral, "),
    pytest.param(["model=nope"], "Valid model names are: custom, digits, digits_cond, gmm, hf_ddpm, toy2d", marks=_SLOW),
    pytest.param(["timesteps=nope"], "Valid time-step schedule names are: auto, beta, edm", marks=_SLOW),
    pytest.param(["solver=heun", "nfe=2"], "cannot meet an NFE budget of 2", marks=_SLOW),
    pytest.param(["metrics=[nope]"], "Valid metric names are: ", marks=_SLOW),
    pytest.param(["solver.variable=nope"], "Valid variables are: sigma_hat, t, lambda", marks=_SLOW),
    pytest.param(["dtype=float16"], "Valid dtypes are: float32, float64", marks=_SLOW),
])
def test_bad_input_is_a_clear_error_and_records_nothing(tmp_path, args, needle):
    r = bench("run", *args, f"results_dir={tmp_path}")
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert rows(tmp_path) == []


def test_unknown_command():
    r = bench("frobnicate")
    assert r.returncode == 2 and "Valid commands are: run" in r.stderr
