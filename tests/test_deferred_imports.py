"""Issue 17 item 4: a plain run imports only what its solver and metrics need.  pandas (report, compare), torchdiffeq
(NLL, the adaptive solvers, trunc's reference solve) and diffusers (the diffusers-scheduler solvers) are imported
inside the functions that use them, so `bench run` with a fixed-step solver and no such metric pays none of them."""
import subprocess
import sys

import pytest

DEFERRED = ("pandas", "torchdiffeq", "diffusers")


def _imported(stderr):
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def _run(tmp_path, *overrides):
    args = [sys.executable, "-X", "importtime", "-m", "bench", "run", "model=gmm", "n_samples=64", "batch_size=64",
            "progress=false", f"results_dir={tmp_path}", *overrides]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return _imported(r.stderr)


@pytest.mark.slow
def test_plain_run_imports_no_pandas_torchdiffeq_or_diffusers(tmp_path):
    # the first run solves trunc's float64 reference with dopri5 (it needs torchdiffeq: the check below can fail);
    # the second, another cell on the same x_T, finds the reference cached and needs none of the three
    first = _run(tmp_path, "solver=heun", "nfe=10", "metrics=[trunc]")
    assert "torchdiffeq" in first
    names = _run(tmp_path, "solver=heun", "nfe=12", "metrics=[trunc]")
    # every solver and every metric module (nll, which integrates with torchdiffeq, among them) was imported
    assert {"torch", "bench.solvers.all", "bench.metrics.nll", "bench.solvers.adaptive"} <= names
    assert not names & set(DEFERRED), sorted(names & set(DEFERRED))


@pytest.mark.slow
def test_a_solver_that_needs_torchdiffeq_still_gets_it(tmp_path):
    assert "torchdiffeq" in _run(tmp_path, "solver=dopri5", "nfe=400", "metrics=[]")
