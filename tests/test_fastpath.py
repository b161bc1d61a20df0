"""A rerun of a recorded cell is skipped before torch is imported (issue 17 item 4, bench/fastpath.py), and only
when the config is exactly the recorded one."""
import subprocess
import sys

import pytest

from bench import fastpath, store
from tests.test_faults import run_cli

BASE = ["model=gmm", "solver=euler", "nfe=4", "n_samples=4", "metrics=[]", "progress=false"]


def test_same_config_is_skipped_by_digest_and_anything_else_is_not(tmp_path):
    rc, out, _ = run_cli("run", *BASE, f"results_dir={tmp_path}")
    assert rc == 0
    runs = store.load_runs(tmp_path)
    assert len(runs) == 1 and isinstance(runs["config_digest"].iloc[0], str)
    from bench import api
    cfg = api.config(*BASE, results_dir=str(tmp_path))
    done = fastpath.recorded(cfg)
    assert done is not None and done["key"] == runs["key"].iloc[0] and done["status"] == "skipped"
    assert fastpath.recorded({**cfg, "force": True}) is None
    assert fastpath.recorded({**cfg, "nfe": 5}) is None
    assert fastpath.recorded({**cfg, "results_dir": str(tmp_path / "elsewhere")}) is None
    # a knob outside the identity changes the digest: the full path then skips by the cell key, as before
    assert fastpath.recorded({**cfg, "progress": True}) is None
    rc, out, _ = run_cli("run", *BASE[:-1], "progress=true", f"results_dir={tmp_path}")
    assert rc == 0 and "skipped" in out and len(store.load_runs(tmp_path)) == 1


def test_a_changed_timesteps_file_is_not_skipped(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("t: [1.0, 0.5, 0.1, 0.001]\n")
    cfg = {"results_dir": str(tmp_path), "force": False, "timesteps": {"name": "explicit", "file": str(grid)}}
    d1 = fastpath.config_digest(cfg)
    grid.write_text("t: [1.0, 0.4, 0.1, 0.001]\n")
    assert fastpath.config_digest(cfg) != d1
    grid.unlink()
    assert fastpath.config_digest(cfg) is None          # unreadable: no fast skip, the full path reports it


@pytest.mark.slow
def test_rerun_of_a_recorded_cell_does_not_import_torch(tmp_path):
    args = [sys.executable, "-X", "importtime", "-m", "bench", "run", *BASE, f"results_dir={tmp_path}"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    def imported(err):
        return [line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")]
    assert "torch" in imported(first.stderr)          # the check below can fail
    second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "skipped" in second.stdout, second.stderr[-2000:]
    names = imported(second.stderr)
    assert "torch" not in names and "bench.run" not in names and "pandas" not in names
    assert len(store.load_runs(tmp_path)) == 1


def test_a_store_that_cannot_answer_falls_back_to_the_full_path(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("odd store")
    (tmp_path / store.DB_NAME).write_text("")
    monkeypatch.setattr(store, "find_done_by_digest", boom)
    assert fastpath.recorded({"results_dir": str(tmp_path), "force": False}) is None
