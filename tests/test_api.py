"""The Python API (bench.api): the README's example runs as written, and it agrees with the command line."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench

ROOT = Path(__file__).resolve().parents[1]


def readme_api_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(readme_api_block(), "README.md (Python API)", "exec"), ns)  # noqa: S102
    out, df = ns["out"], ns["df"]
    assert out.nfe == 10 and out.steps == 10 and tuple(out.x0.shape) == (256, 4)
    assert len(df) == 4 and set(df["status"]) == {"ok"} and list(df["nfe"]) == [9, 17, 9, 17]
    # the error falls with NFE for both solvers
    for s in ("euler", "heun"):
        e = df[df.solver == s].set_index("nfe_budget")["trunc_rms"]
        assert e[17] < e[9]


def test_sample_agrees_with_run_cell_and_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = str(tmp_path / "results")
    out = bench.sample("gmm", "heun", nfe=13, n_samples=32, seed=3, dtype="float64")
    m_api = bench.compute_metrics(out, ["trunc"], results_dir=res)
    row = bench.run_cell(model="gmm", solver="heun", nfe=13, n_samples=32, seed=3, dtype="float64",
                         metrics=["trunc"], results_dir=res, save_samples=32)
    assert row["status"] == "ok" and row["nfe"] == out.nfe == 13
    assert row["metrics"]["trunc_rms"] == pytest.approx(m_api["trunc_rms"], rel=1e-12)
    import numpy as np
    saved = np.load(Path(res) / row["samples_path"])["samples"]
    assert np.allclose(saved, out.x0.float().numpy(), rtol=0, atol=1e-6)
    # the same cell from the command line has the same key: it is skipped as already recorded
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "bench", "run", "model=gmm", "solver=heun", "nfe=13", "n_samples=32",
                        "seed=3", "dtype=float64", "metrics=[trunc]", f"results_dir={res}", "save_samples=32"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "skipped" in r.stdout and "already recorded" in r.stdout, r.stdout + r.stderr


def test_api_bad_input_is_a_config_error():
    with pytest.raises(bench.ConfigError, match="has no knob 'gamma'"):
        bench.sample("gmm", "heun", nfe=9, n_samples=2, gamma=1.0)
    with pytest.raises(bench.ConfigError, match="cannot meet an NFE budget of 3"):
        bench.sample("gmm", "rk4", nfe=3, n_samples=2)
    with pytest.raises(bench.ConfigError, match="solver"):
        bench.config(solver="no_such_solver")


def test_model_by_config_dict():
    m = bench.load_model({"name": "gmm", "dim": 3, "schedule": {"name": "vp_cosine"}})
    assert m.shape == (3,) and m.cfg["dim"] == 3
    out = bench.sample(m, "euler", nfe=5, n_samples=4)
    assert out.nfe == 5 and torch.isfinite(out.x0).all()
