"""The store and the inputs under faults (issue 12): no lost work, no code run from data, no write outside
results_dir, a clear error before any work for every malformed input, and diverged_step exact for every solver."""
import contextlib
import io
import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import fsio, store
from bench import run as brun
from bench.__main__ import main as cli

ROOT = Path(__file__).resolve().parents[1]
GMM = ["model=gmm", "n_samples=8", "metrics=[]", "progress=false"]


def run_cli(*args):
    """The command line in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli(list(args))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def n_rows(results_dir) -> int:
    return len(store.load_runs(results_dir)) if store.db_path(results_dir).exists() else 0


# ---------------------------------------------------------------------------------------------- bad inputs
def bad_inputs(tmp: Path):
    a_file = tmp / "a_file"
    a_file.write_text("x")
    empty_csv, bad_csv = tmp / "empty.csv", tmp / "bad.csv"
    empty_csv.write_text("")
    bad_csv.write_text("a,b\n1,2,3,4\n\"unterminated\n")
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "results.sqlite").write_bytes(b"this is not a database" * 100)
    foreign = tmp / "foreign"
    foreign.mkdir()
    con = sqlite3.connect(foreign / "results.sqlite")
    con.execute("CREATE TABLE runs (x TEXT)")
    con.commit()
    con.close()
    R = f"results_dir={tmp / 'r'}"
    run = [
        ("nfe=0",), ("nfe=-5",), ("nfe=abc",), ("nfe=1.5",), ("nfe=1000000000000",), ("nfe==3",),
        ("seed=-1",), ("seed=1.5",), ("seed=abc",), ("n_samples=0",), ("n_samples=abc",), ("batch_size=0",),
        ("batch_size=-1",), ("dtype=float16",), ("device=tpu",), ("solver=nope",), ("model=nope",),
        ("timesteps=nope",), ("metrics=[nope]",), ("metrics=trunc",), ("+solver.foo=1",), ("solver.variable=xyz",),
        ("solver=dpm_solver_pp", "solver.order=abc"), ("solver=dpm_solver_pp", "solver.order=7"),
        ("num_shards=0",), ("workers=0",), ("num_shards=2", "shard_index=5"), ("shard_index=-1",),
        ("save_samples=-1",), ("results_dir=",), ("results_dir=null",), (f"results_dir={a_file}",),
        (f"results_dir={a_file}/sub",), ("model.schedule.beta_min=-1",), ("model.schedule.t_min=2",),
        ("model.schedule.T=0",), ("model.schedule.name=nope",), ("+model.schedule.foo=1",), ("timesteps=explicit",),
        ("timesteps=explicit", "timesteps.t=[0.5,0.9]"), ("solver=rk4", "nfe=3"),
        ("solver=dopri5", "solver.rtol=-1"), ("solver=dopri5", "solver.method=nope"),
        ("solver=edm_stochastic", "solver.S_noise=0"), ("solver=ancestral", "solver.eta=-1"),
        ("solver=pc", "solver.snr=0"), ("metrics=[trunc]", "metric_cfg.trunc.n_samples=0"),
        ("metrics=[trunc]", "metric_cfg.trunc.rtol=-1"), ("force=maybe",), ("progress=2",),
        ("model=custom", "model.factory=no.such:fn"), ("model=custom", "model.weights=/nonexistent.pt"),
        ("model.dim=0",), ("model.n_components=0",), ("model=hf_ddpm", "model.path=/nonexistent"),
        ("solver.variable=1",), ("solver=ab", "solver.order=9"), ("solver=unipc", "solver.variant=bh3"),
        ("timesteps=explicit", "timesteps.t=[1.0,0.5,0.00001]"), ("model.schedule.beta_max=nan",),
    ]
    cases = [("run", *GMM, R, *c) for c in run]
    cases += [("run", *GMM, f"results_dir={corrupt}"), ("run", *GMM, f"results_dir={foreign}"),
              ("compare",), ("compare", "baseline=/nonexistent"), ("compare", f"baseline={empty_csv}"),
              ("compare", f"baseline={bad_csv}"), ("merge", str(tmp / "nonexistent")), ("report", f"results_dir={a_file}"),
              ("export", "format=xml", R), ("orders", "--samples", "0"), ("orders", "--only", "nope"),
              ("report", f"results_dir={corrupt}"), ("export", f"results_dir={foreign}"),
              ("merge", str(corrupt), f"into={tmp / 'm'}")]
    return cases


@pytest.mark.slow
def test_every_malformed_input_is_a_clear_error(tmp_path):
    cases = bad_inputs(tmp_path)
    assert len(cases) >= 60
    bad = []
    for c in cases:
        rc, out, err = run_cli(*c)
        if rc == 0 or "Traceback" in err + out or "error" not in err.lower():
            bad.append((c, rc, (err or out)[-300:]))
    assert not bad, "\n".join(map(str, bad))
    assert n_rows(tmp_path / "r") == 0                  # nothing recorded for any of them


def test_a_few_malformed_inputs_quickly(tmp_path):
    for c in [("nfe=1000000000000",), ("seed=1.5",), ("results_dir=",), ("+solver.foo=1",), ("nfe==3",)]:
        rc, out, err = run_cli("run", *GMM, f"results_dir={tmp_path}", *c)
        assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, (c, err)
    assert n_rows(tmp_path) == 0


# ---------------------------------------------------------------------------------------------- the store
def test_results_dir_that_is_a_file_fails_before_any_work(tmp_path):
    f = tmp_path / "results"
    f.write_text("x")
    rc, out, err = run_cli("run", *GMM, f"results_dir={f}")
    assert rc == 2 and "exists and is not a directory" in err and "Traceback" not in err


def test_unwritable_results_dir_is_a_clear_error(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    real = Path.write_bytes

    def deny(self, data):
        if self.parent == d:
            raise PermissionError(13, "Permission denied")
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", deny)      # a read-only directory (chmod does not stop root)
    rc, out, err = run_cli("run", *GMM, f"results_dir={d}")
    assert rc == 2 and "is not writable (Permission denied)" in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_chmod_read_only_results_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        rc, out, err = run_cli("run", *GMM, f"results_dir={d}")
        assert rc == 2 and "not writable" in err
    finally:
        d.chmod(0o755)


@pytest.mark.parametrize("content,needle", [(b"garbage" * 200, "is corrupt or not an SQLite database"),
                                            (None, "has a table 'runs' that is not this suite's")])
def test_corrupt_or_foreign_store_is_refused(tmp_path, content, needle):
    db = tmp_path / "results.sqlite"
    if content is None:
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE runs (x TEXT)")
        con.commit()
        con.close()
    else:
        db.write_bytes(content)
    before = db.read_bytes()
    rc, out, err = run_cli("run", *GMM, f"results_dir={tmp_path}")
    assert rc == 2 and needle in err and "Traceback" not in err
    assert db.read_bytes() == before                    # left as it was


def test_insert_failure_keeps_the_row_in_the_journal_and_the_next_run_records_it(tmp_path, monkeypatch):
    cfg_args = ["run", *GMM, f"results_dir={tmp_path}", "metrics=[trunc]", "metric_cfg.trunc.n_samples=8"]
    real = store._insert

    def locked(*a, **k):
        raise sqlite3.OperationalError("database is locked")
    monkeypatch.setattr(store, "_insert", locked)
    rc, out, err = run_cli(*cfg_args)
    assert rc == 1 and "NOT recorded" in out and "the row is kept in" in out + err and "Traceback" not in err
    journal = list((tmp_path / "journal").glob("*.json"))
    assert len(journal) == 1 and json.loads(journal[0].read_text())["status"] == "ok"
    kept = json.loads(journal[0].read_text())
    monkeypatch.setattr(store, "_insert", real)
    rc, out, err = run_cli(*cfg_args)                   # replays the journal first, then skips the cell
    assert rc == 0 and "skipped" in out and "already recorded" in out
    df = store.load_runs(tmp_path)
    assert len(df) == 1 and df.iloc[0]["key"] == kept["key"]
    assert json.loads(df.iloc[0]["metrics"]) == json.loads(kept["metrics"])    # the computed numbers, not redone
    assert not list((tmp_path / "journal").glob("*"))


def test_replay_leaves_a_row_in_flight_to_its_writer(tmp_path, monkeypatch):
    """The race CI met with four joblib workers: worker B opens the store (and replays the journal) between
    worker A's journal write and A's insert.  B must not take A's row, else A reports its own cell as skipped."""
    store.open_store(tmp_path)
    real, seen = store._insert, {}

    def other_worker_opens_the_store_first(*a, **k):
        seen["in_journal"] = len(list((tmp_path / "journal").glob("*.json")))
        seen["replayed"] = store.replay_journal(tmp_path)
        return real(*a, **k)
    monkeypatch.setattr(store, "_insert", other_worker_opens_the_store_first)
    rid = store.record(tmp_path, {"key": "k1", "status": "ok"})
    assert seen == {"in_journal": 1, "replayed": 0} and rid is not None       # A recorded its own row
    assert not list((tmp_path / "journal").glob("*")) and len(store.load_runs(tmp_path)) == 1


def test_a_row_whose_writer_gave_up_is_replayed_by_the_next_worker(tmp_path, monkeypatch):
    store.open_store(tmp_path)

    def locked(*a, **k):
        raise sqlite3.OperationalError("database is locked")
    real = store._insert
    monkeypatch.setattr(store, "_insert", locked)
    with pytest.raises(store.StoreError, match="the row is kept in"):
        store.record(tmp_path, {"key": "k2", "status": "ok"})
    monkeypatch.setattr(store, "_insert", real)
    path, fd = store._journal_open(tmp_path, {"key": "k3", "status": "ok"})    # a live writer's row
    try:
        assert store.replay_journal(tmp_path) == 1                             # k2 only: its lock was released
        assert list(store.load_runs(tmp_path)["key"]) == ["k2"] and path.exists()
    finally:
        store._unlock(fd)
    assert store.replay_journal(tmp_path) == 1 and sorted(store.load_runs(tmp_path)["key"]) == ["k2", "k3"]


def test_fsync_failure_falls_back_with_a_warning(tmp_path, monkeypatch):
    """SQLite reports a failing fsync as 'disk I/O error'; the store reopens with synchronous=OFF."""
    calls = {"n": 0}
    real = store._setup

    def failing(con, path):
        if fsio.fsync_ok():
            calls["n"] += 1
            raise sqlite3.OperationalError("disk I/O error")
        return real(con, path)
    monkeypatch.setattr(store, "_setup", failing)
    monkeypatch.setitem(fsio._FSYNC, "ok", True)
    rc, out, err = run_cli("run", *GMM, f"results_dir={tmp_path}")
    assert rc == 0 and calls["n"] == 1 and "warning: fsync fails on this disk" in err
    assert n_rows(tmp_path) == 1
    fsio._FSYNC["ok"] = True


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to make fsync fail")
def test_main_command_on_a_disk_whose_fsync_fails(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = ["strace", "-f", "-o", "/dev/null", "-e", "inject=fsync,fdatasync:error=EIO", sys.executable, "-m", "bench",
           "run", "model=gmm", "solver=heun", "nfe=18", "n_samples=64", f"results_dir={tmp_path}"]
    probe = subprocess.run(["strace", "-f", "-o", "/dev/null", "-e", "inject=fsync:error=EIO", sys.executable, "-c",
                            "import os,tempfile; f=tempfile.TemporaryFile(); os.fsync(f.fileno())"],
                           capture_output=True, text=True)
    if probe.returncode == 0:
        pytest.skip("strace cannot inject faults here")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: fsync fails on this disk" in r.stderr and "Traceback" not in r.stderr
    assert n_rows(tmp_path) == 1 and "trunc_rms" in r.stdout


# ---------------------------------------------------------------------------------------------- no code from data
class Payload:
    """A pickle that, when loaded, would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def plant(path: Path, marker: Path):
    with open(path, "wb") as f:
        pickle.dump({"key": {}, "value": Payload(marker)}, f)


def test_planted_pickles_are_refused_and_recomputed(tmp_path):
    marker = tmp_path / "PWNED"
    res = tmp_path / "r"
    args = ["run", "model=gmm", "n_samples=16", "metrics=[trunc,fid]", "metric_cfg.trunc.n_samples=16",
            f"results_dir={res}", "progress=false"]
    rc, out, _ = run_cli(*args)
    assert rc == 0
    first = store.load_runs(res).iloc[0]
    entries = list((res / "cache").rglob("*.pt"))
    assert entries
    for p in entries:
        plant(p, marker)
    samples = res / first["samples_path"]
    import numpy as np
    np.savez(samples, samples=np.array([Payload(marker)], dtype=object))
    rc, out, err = run_cli(*args, "force=true")
    assert rc == 0 and not marker.exists()
    assert "could run code; refused" in err and "recomputing it" in err
    again = store.load_runs(res).iloc[0]
    assert json.loads(again["metrics"]) == json.loads(first["metrics"])
    # report reads sample files without pickle
    np.savez(res / again["samples_path"], samples=np.array([Payload(marker)], dtype=object))
    rc, out, err = run_cli("report", f"results_dir={res}")
    assert rc == 0 and not marker.exists() and "needs pickle" in err


def test_planted_pickle_shard_is_refused_and_regenerated(tmp_path):
    marker = tmp_path / "PWNED"
    res = tmp_path / "r"
    base = ["run", "model=gmm", "n_samples=12", "metrics=[]", f"results_dir={res}", "num_shards=3",
            "progress=false"]
    rc, out, _ = run_cli(*base, "shard_index=1")
    assert rc == 0
    (shard,) = list((res / "shards").rglob("1-of-3.pt"))
    plant(shard, marker)
    rc, out, err = run_cli(*base)
    assert rc == 0 and not marker.exists() and "refused" in err and "regenerating shard 1" in err
    assert n_rows(res) == 1


def test_planted_pickle_weights_are_refused(tmp_path):
    from bench.models.errors import ConfigError
    from bench.models.netio import read_checkpoint
    marker = tmp_path / "PWNED"
    w = tmp_path / "net.pt"
    plant(w, marker)
    with pytest.raises(ConfigError, match="corrupt or not a torch checkpoint"):
        read_checkpoint(str(w), "model=custom")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- paths
def test_merge_and_report_stay_inside_results_dir(tmp_path):
    src, into = tmp_path / "src", tmp_path / "into"
    rc, *_ = run_cli("run", *GMM, f"results_dir={src}", "save_samples=4")
    assert rc == 0
    con = sqlite3.connect(src / "results.sqlite")
    con.execute("UPDATE runs SET samples_path = '../../escaped.npz', model = '../../x'")
    con.commit()
    con.close()
    shutil.copy(next((src / "samples").glob("*.npz")), tmp_path / "escaped.npz")
    rc, out, err = run_cli("merge", str(src), f"into={into}")
    assert rc == 0 and "not samples/<key>.npz" in err
    assert not (tmp_path.parent / "escaped.npz").exists() and not list(into.rglob("*.npz"))
    rc, out, err = run_cli("report", f"results_dir={into}")
    assert rc == 2 and "model name '../../x' cannot name a folder" in err
    assert not (tmp_path / "x").exists() and not (into.parent / "x").exists()
    with pytest.raises(Exception, match="outside results_dir"):
        fsio.inside(into, "../x", "path")


def test_merge_source_with_an_extra_column(tmp_path):
    src, into = tmp_path / "src", tmp_path / "into"
    assert run_cli("run", *GMM, f"results_dir={src}")[0] == 0
    con = sqlite3.connect(src / "results.sqlite")
    con.execute("ALTER TABLE runs ADD COLUMN from_the_future TEXT")
    con.commit()
    con.close()
    rc, out, err = run_cli("merge", str(src), f"into={into}")
    assert rc == 0 and "from_the_future" in err and n_rows(into) == 1


def test_stale_temporary_files_are_cleaned(tmp_path):
    (tmp_path / "samples").mkdir()
    dead = tmp_path / "samples" / f"abc.npz{fsio.TMP_MARK}{__import__('socket').gethostname()}-999999-0123456789"
    legacy = tmp_path / "samples" / "abc.npz.tmp12345"
    live = tmp_path / "samples" / f"abc.npz{fsio.TMP_MARK}{__import__('socket').gethostname()}-{os.getpid()}-0123456789"
    for f in (dead, legacy, live):
        f.write_text("partial")
    old = 10_000
    os.utime(legacy, (os.path.getmtime(legacy) - old, os.path.getmtime(legacy) - old))
    store.open_store(tmp_path)
    assert not dead.exists() and not legacy.exists() and live.exists()


# ---------------------------------------------------------------------------------------------- divergence
ENDPOINT_STAGE = {"heun", "rk3", "rk4", "edm_stochastic", "pc", "unipc", "restart", "sa_solver"}   # evaluate at their step's end point


def _solvers():
    import bench.solvers.all  # noqa: F401
    from bench.solvers.registry import SOLVERS
    return sorted(n for n in SOLVERS if n not in ("dopri5", "diffusers"))


@pytest.mark.parametrize("name", _solvers())
def test_diverged_step_is_the_first_step_with_a_non_finite_output(gmm_model, name):
    """The network returns NaN at every time <= t[j]: a solver whose step j evaluates at its end point t[j] (Heun's
    corrector, UniPC's free evaluation, pc's Langevin steps) first outputs NaN at step j, the others at step j+1."""
    from bench.models.dynamics import Dynamics
    from bench.solvers.registry import get_solver
    from bench.solvers.rng import PerSampleRNG
    from bench.solvers.timesteps import make_timesteps
    spec = get_solver(name)
    knobs = {}
    t = make_timesteps(spec.default_timesteps, gmm_model.schedule, 8).double()
    for j in (2, 5):
        t_bad = float(t[j])

        def net(x, tt, t_bad=t_bad):
            out = gmm_model.net(x, tt)
            return torch.where(tt.reshape(-1, *[1] * (x.dim() - 1)) <= t_bad * (1 + 1e-12), torch.nan, out)
        model = SimpleNamespace(net=net, schedule=gmm_model.schedule, shape=gmm_model.shape)
        step = brun.locate_divergence(model, spec, knobs, t, 0, [0, 1], torch.device("cpu"), torch.float64)
        expect = j if name in ENDPOINT_STAGE else j + 1
        assert step == expect, (name, j, step)
        # independent check for the one-evaluation-per-step samplers: the state x_j that step j+1 starts from (the
        # input of the evaluation at t[j]) is finite, so step j+1 is the first with a non-finite output
        if name in ("euler", "ab", "ancestral", "euler_maruyama", "dpm_solver_pp"):
            seen = {}

            def spy(x, tt, net=net):
                seen.setdefault(round(float(tt.reshape(-1)[0]), 9), bool(torch.isfinite(x).all()))
                return net(x, tt)
            rng = PerSampleRNG(0, [0, 1], dtype=torch.float64)
            spec.fn(Dynamics(spy, gmm_model.schedule), rng.randn(gmm_model.shape), t, rng)
            assert seen[round(t_bad, 9)] is True


# ---------------------------------------------------------------------------------------------- batch-coupled NFE
def test_adaptive_solver_with_batches_of_different_nfe_is_recorded(tmp_path):
    rc, out, err = run_cli("run", "model=gmm", "solver=dopri5", "nfe=400", "n_samples=40", "batch_size=7",
                           "metrics=[]", f"results_dir={tmp_path}", "progress=false")
    assert rc == 0, err
    row = store.load_runs(tmp_path).iloc[0]
    assert row["status"] == "ok"
    per = json.loads(row["nfe_batches"]) if isinstance(row["nfe_batches"], str) else None
    assert per is None or (len(per) == 6 and row["nfe"] == max(per) <= 400)


# ---------------------------------------------------------------------------------------------- parallel workers
@pytest.mark.slow
def test_four_joblib_workers_sharing_caches_never_fail(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for trial in range(2):
        res = tmp_path / f"r{trial}"
        r = subprocess.run([sys.executable, "-m", "bench", "run", "-m", "model=gmm", "solver=euler,heun,rk4",
                            "nfe=9,17,33,65", "n_samples=64", "metrics=[trunc,fid]", "hydra/launcher=joblib",
                            "hydra.launcher.n_jobs=4", f"results_dir={res}", "progress=false"],
                           capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        df = store.load_runs(res)
        assert len(df) == 12 and set(df["status"]) == {"ok"}, df[["solver", "status", "error"]]
        assert "12 cells: 12 done, 0 skipped, 0 failed" in r.stdout + r.stderr


@pytest.mark.slow
def test_two_sweeps_started_together_report_their_own_cells(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    common = [sys.executable, "-m", "bench", "run", "-m", "model=gmm", "n_samples=8", "metrics=[]",
              f"results_dir={tmp_path}", "progress=false"]
    procs = [subprocess.Popen([*common, "solver=euler,heun", "nfe=5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, cwd=tmp_path),
             subprocess.Popen([*common, "solver=euler,heun,rk4", "nfe=9"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert "sweep summary: 2 cells: 2 done" in outs[0], outs[0][-2000:]
    assert "sweep summary: 3 cells: 3 done" in outs[1], outs[1][-2000:]
    sweeps = list((tmp_path / "hydra" / "multirun").glob("*/*"))
    assert len(sweeps) == 2
