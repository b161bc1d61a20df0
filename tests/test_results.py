"""Results store, cell keys, skipping, divergence/failure rows, sharding, report and compare."""
import json
import sqlite3

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench import report as rep
from bench import run as brun
from bench import store
from bench.app import CONF_DIR
from bench.compare import regressions
from bench.models.registry import LoadedModel, load_model, register_model


def cfg_for(results_dir, *overrides):
    with initialize_config_dir(CONF_DIR, version_base=None):
        c = compose("config", ["model=gmm", "n_samples=16", "batch_size=8", "progress=false", f"results_dir={results_dir}",
                               *overrides])
    return OmegaConf.to_container(c, resolve=True)


def count_rows(results_dir):
    with sqlite3.connect(store.db_path(results_dir)) as con:
        return con.execute("SELECT key, status, COUNT(*) FROM runs GROUP BY key, status").fetchall()


# ---- cell identity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override", ["seed=1", "n_samples=17", "nfe=17", "solver=euler", "solver.variable=t",
                                      "model.dim=3", "timesteps=logsnr", "metric_cfg.trunc.rtol=1e-6",
                                      "metrics=[]", "dtype=float64", "model.parametrization=x0",
                                      "model.conditional=true", "model.schedule.name=sub_vp"])
def test_key_covers_what_determines_the_numbers(tmp_path, override):
    base = brun.cell_key(brun.cell_identity(cfg_for(tmp_path)))
    assert brun.cell_key(brun.cell_identity(cfg_for(tmp_path, override))) != base


@pytest.mark.parametrize("override", ["batch_size=4", "num_shards=3", "workers=2", "progress=true", "force=true",
                                      "save_samples=0", "device=cpu"])
def test_key_ignores_what_does_not(tmp_path, override):
    base = brun.cell_key(brun.cell_identity(cfg_for(tmp_path)))
    assert brun.cell_key(brun.cell_identity(cfg_for(tmp_path, override))) == base


def test_keys_added_later_at_their_neutral_value_keep_the_cell_id(tmp_path):
    """A cell recorded before `parametrization`, `conditional` (gmm) or the explicit grid's `file`/`source` existed
    keeps its id, so `bench compare` still matches old stores and baselines."""
    cfg = cfg_for(tmp_path)
    old = json.loads(json.dumps(cfg))
    for k in ("parametrization", "conditional"):
        old["model"].pop(k)
    assert brun.cell_id(brun.cell_identity(old)) == brun.cell_id(brun.cell_identity(cfg))
    cfg = cfg_for(tmp_path, "timesteps=explicit", "timesteps.t=[1.0,0.5,0.001]", "nfe=3", "solver=euler")
    old = json.loads(json.dumps(cfg))
    old["timesteps"].pop("file"), old["timesteps"].pop("source")
    assert brun.cell_id(brun.cell_identity(old)) == brun.cell_id(brun.cell_identity(cfg))


def test_cell_id_drops_only_the_code_version(tmp_path, monkeypatch):
    ident = brun.cell_identity(cfg_for(tmp_path))
    other = {**ident, "code_version": "0000"}
    assert brun.cell_id(other) == brun.cell_id(ident) and brun.cell_key(other) != brun.cell_key(ident)


# ---- store -------------------------------------------------------------------------------------------

def test_store_records_each_finished_cell_once(tmp_path):
    row = {"key": "k1", "cell": "c1", "status": "failed", "model": "m", "error": "boom"}
    assert store.record(tmp_path, row) and store.record(tmp_path, row)   # failed rows are history
    assert store.find_done(tmp_path, "k1") is None
    ok = {**row, "status": "ok", "error": None, "metrics": {"trunc_rms": 0.1}}
    assert store.record(tmp_path, ok) is not None                         # replaces the failed rows
    assert store.record(tmp_path, ok) is None                             # a second finisher is refused
    assert count_rows(tmp_path) == [("k1", "ok", 1)]
    rid = store.record(tmp_path, {**ok, "metrics": {"trunc_rms": 0.2}}, force=True)
    assert count_rows(tmp_path) == [("k1", "ok", 1)]
    assert json.loads(store.find_done(tmp_path, "k1")["metrics"])["trunc_rms"] == 0.2 and rid


def test_unique_index_refuses_a_raw_duplicate(tmp_path):
    store.record(tmp_path, {"key": "k", "status": "ok"})
    with sqlite3.connect(store.db_path(tmp_path)) as con, pytest.raises(sqlite3.IntegrityError):
        con.execute("INSERT INTO runs (key, status) VALUES ('k', 'diverged')")


@pytest.mark.slow
def test_export_csv_and_parquet_round_trip(tmp_path):
    cfg = cfg_for(tmp_path, "solver=euler", "nfe=8", "n_samples=4")
    row = brun.run(cfg)
    for fmt in ("csv", "parquet"):
        p = store.export(tmp_path, fmt=fmt)
        df = pd.read_csv(p) if fmt == "csv" else pd.read_parquet(p)
        assert list(df["key"]) == [row["key"]]
        assert df["trunc_rms"].iloc[0] == pytest.approx(row["metrics"]["trunc_rms"], rel=1e-12)


# ---- skipping happens before any work ------------------------------------------------------------------

def test_rerun_skips_before_sampling_unless_forced(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, "solver=euler", "nfe=8", "n_samples=4", "metrics=[]")
    first = brun.run(cfg)
    assert first["status"] == "ok" and (tmp_path / first["samples_path"]).exists()

    def no_work(*a, **k):
        raise AssertionError("sampled or loaded a model for a cell already done")
    monkeypatch.setattr(brun, "generate", no_work)
    monkeypatch.setattr(brun, "plan", no_work)
    again = brun.run(cfg)
    assert again["status"] == "skipped" and str(first["id"]) in again["reason"]
    monkeypatch.undo()
    forced = brun.run({**cfg, "force": True})
    assert forced["status"] == "ok" and forced["metrics"] == first["metrics"]
    assert count_rows(tmp_path) == [(first["key"], "ok", 1)]


# ---- diverged and failed cells -----------------------------------------------------------------------

class _NaNBelow:
    """The gmm network, but NaN for t below t_bad (or raising, for the failure test)."""

    def __init__(self, net, t_bad, raise_instead=False):
        self.net, self.t_bad, self.raise_instead = net, t_bad, raise_instead

    def __call__(self, x, t):
        if float(t.reshape(-1)[0]) < self.t_bad:
            if self.raise_instead:
                raise RuntimeError("network exploded")
            return torch.full_like(x, float("nan"))
        return self.net(x, t)


@register_model("gmm_nan_test")
def _load_nan(cfg):
    base = load_model({"name": "gmm", "schedule": cfg["schedule"]})
    return LoadedModel("gmm_nan_test", _NaNBelow(base.net, cfg["t_bad"], cfg.get("raise", False)), base.schedule,
                       base.shape)


def _nan_cfg(tmp_path, **model):
    cfg = cfg_for(tmp_path, "solver=euler", "nfe=12", "metrics=[]")
    cfg["model"] = {"name": "gmm_nan_test", "schedule": cfg["model"]["schedule"], "t_bad": 0.05, **model}
    return cfg


def test_diverging_solver_records_status_and_step(tmp_path):
    cfg = _nan_cfg(tmp_path)
    row = brun.run(cfg)
    _, _, _, _, _, _, _, t = brun.plan(cfg)
    m = int(np.argmax(t.numpy() < 0.05))   # first grid point where the network returns NaN
    assert row["status"] == "diverged" and row["n_diverged"] == 16
    assert row["diverged_step"] == m + 1   # step m+1 starts at t[m] (1-based)
    assert 1 < row["diverged_step"] < row["steps"]
    assert brun.run(cfg)["status"] == "skipped"   # diverged finishes the cell


def test_step_of_attributes_bad_inputs_to_the_previous_step():
    t = torch.tensor([1.0, 0.5, 0.25, 0.1])
    assert brun.step_of(t, "input", 0.25) == 2 and brun.step_of(t, "output", 0.25) == 3
    assert brun.step_of(t, "output", 0.3) == 2 and brun.step_of(t, "input", None) == 4


def test_failing_run_records_status_and_message(tmp_path):
    row = brun.run(_nan_cfg(tmp_path, **{"raise": True}))
    assert row["status"] == "failed" and "network exploded" in row["error"]
    assert [r[1:] for r in count_rows(tmp_path)] == [("failed", 1)]


# ---- sharding ---------------------------------------------------------------------------------------

def test_samples_do_not_depend_on_sharding(tmp_path):
    cfg = cfg_for(tmp_path, "solver=heun", "nfe=9", "n_samples=10", "batch_size=3", "save_samples=10", "metrics=[]")
    one = brun.run({**cfg, "results_dir": str(tmp_path / "a")})
    # three shards: shard 1 made by a separate "machine" run, the others gathered in the final run
    sharded = {**cfg, "results_dir": str(tmp_path / "b"), "num_shards": 3}
    assert brun.run({**sharded, "shard_index": 1})["status"] == "shard"
    assert store.load_runs(tmp_path / "b").empty
    three = brun.run(sharded)
    assert three["key"] == one["key"] and three["nfe"] == one["nfe"]
    a = np.load(tmp_path / "a" / one["samples_path"])["samples"]
    b = np.load(tmp_path / "b" / three["samples_path"])["samples"]
    assert np.array_equal(a, b)


@pytest.mark.slow
def test_sharding_over_worker_processes(tmp_path):
    cfg = cfg_for(tmp_path, "solver=euler", "nfe=6", "n_samples=9", "save_samples=9", "metrics=[]")
    one = brun.run({**cfg, "results_dir": str(tmp_path / "a")})
    par = brun.run({**cfg, "results_dir": str(tmp_path / "b"), "num_shards": 2, "workers": 2})
    a = np.load(tmp_path / "a" / one["samples_path"])["samples"]
    assert np.array_equal(a, np.load(tmp_path / "b" / par["samples_path"])["samples"])


# ---- report -------------------------------------------------------------------------------------------

def test_fit_order_recovers_the_slope():
    nfe = np.array([8, 16, 32, 64])
    assert rep.fit_order(nfe, 3.0 * nfe ** -2.5) == pytest.approx(2.5, abs=1e-12)
    assert np.isnan(rep.fit_order([8], [0.1]))


def test_mosaic_places_each_image():
    x = np.stack([np.full((1, 8, 8), v) for v in (-0.5, 0.0, 0.5, 1.0)])
    m = rep.mosaic(x)
    assert m.shape == (17, 17) and m[0, 0] == -0.5 and m[0, 9] == 0.0 and m[9, 0] == 0.5 and m[16, 16] == 1.0


@pytest.mark.slow
def test_report_writes_tables_plots_and_grids(tmp_path):
    for s in ("euler", "heun"):
        for nfe in (5, 9, 17):
            brun.run(cfg_for(tmp_path, f"solver={s}", f"nfe={nfe}", "n_samples=8"))
    # an image-shaped model's rows (as digits will write them) get an image grid
    imgs = np.random.default_rng(0).uniform(-1, 1, (16, 1, 8, 8)).astype(np.float32)
    (tmp_path / "samples").mkdir(exist_ok=True)
    np.savez(tmp_path / "samples" / "img.npz", samples=imgs)
    for nfe, fid in ((10, 30.0), (20, 12.0)):
        store.record(tmp_path, {"key": f"img{nfe}", "cell": f"img{nfe}", "status": "ok", "model": "images",
                                "solver": "euler", "solver_knobs": {}, "timesteps": "edm", "nfe_budget": nfe,
                                "nfe": nfe, "metrics": {"fid": fid, "nll_bpd": 1.5}, "code_version": "x",
                                "samples_path": "samples/img.npz"})
    files = {p.relative_to(tmp_path / "report").as_posix() for p in rep.report(tmp_path)}
    assert {"gmm/trunc_rms.csv", "gmm/trunc_rms.png", "gmm/samples.png", "gmm/report.md",
            "images/fid.csv", "images/nll_bpd.csv", "images/samples.png"} <= files
    t = pd.read_csv(tmp_path / "report" / "gmm" / "trunc_rms.csv")
    assert sorted(set(t["solver"])) == ["euler [edm]", "heun [edm]"] and sorted(set(t["nfe_budget"])) == [5, 9, 17]
    assert (t["seeds"] == 1).all() and (t["se"] > 0).all()               # one seed: the row's own standard error
    rows = store.load_runs(tmp_path)
    e = rows[(rows.solver == "euler") & (rows.model == "gmm")].sort_values("nfe")
    md = (tmp_path / "report" / "gmm" / "report.md").read_text()
    assert f"{rep.fit_order(e['nfe'], e['trunc_rms']):.2f}" in md    # fitted order in the table
    assert f"{e['trunc_rms'].iloc[0]:.4g} ± {e['trunc_rms_se'].iloc[0]:.2g}" in md      # value ± se
    f = pd.read_csv(tmp_path / "report" / "images" / "fid.csv")
    assert f.set_index("nfe_budget").loc[20, "value"] == 12.0


# ---- compare --------------------------------------------------------------------------------------------

def _frame(**metrics):
    return pd.DataFrame([{"id": 1, "cell": "c", "status": "ok", "model": "m", "solver": "s", "nfe_budget": 10,
                          "seed": 0, "n_samples": 8, **metrics}])


@pytest.mark.parametrize("base,cur,bad", [
    ({"fid": 10.0}, {"fid": 10.9}, False), ({"fid": 10.0}, {"fid": 11.2}, True),
    ({"nll_bpd": 1.00}, {"nll_bpd": 1.015}, False), ({"nll_bpd": 1.00}, {"nll_bpd": 1.03}, True),
    ({"trunc_rms": 0.01}, {"trunc_rms": 0.014}, False), ({"trunc_rms": 0.01}, {"trunc_rms": 0.016}, True),
    ({"trunc_rms": 0.01}, {"trunc_rms": 0.001}, False),
])
def test_tolerances(base, cur, bad):
    out, n = regressions(_frame(**cur), _frame(**base))
    assert n == 1 and bool(out) == bad


def test_a_cell_that_now_diverges_is_a_regression():
    cur = _frame(trunc_rms=None).assign(status="diverged", diverged_step=3)
    out, _ = regressions(cur, _frame(trunc_rms=0.01))
    assert out and out[0][1] == "status"


def test_merge_copies_each_cell_once(tmp_path):
    a, b, into = tmp_path / "a", tmp_path / "b", tmp_path / "into"
    ra = brun.run(cfg_for(a, "solver=euler", "nfe=6", "n_samples=4", "metrics=[]"))
    brun.run(cfg_for(b, "solver=euler", "nfe=6", "n_samples=4", "metrics=[]"))      # the same cell on node b
    brun.run(cfg_for(b, "solver=heun", "nfe=7", "n_samples=4", "metrics=[]"))
    assert store.merge(into, [a, b]) == (2, 1)
    assert store.merge(into, [a, b]) == (0, 3)
    assert sorted(n for _, _, n in count_rows(into)) == [1, 1]
    assert (into / ra["samples_path"]).exists()
