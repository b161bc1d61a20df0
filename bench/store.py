"""The results store: one SQLite database, one row per benchmark cell.

A cell is identified by `key` (bench.run.cell_key: model and its config, solver and knobs, time steps,
NFE budget, seed, sample count, dtype, metric protocol, code version); `cell` is the same identity
without the code version, which `bench compare` matches on across versions.

Safety under real use:
- each insert is one transaction (WAL journal): a killed writer leaves no partial row;
- a partial UNIQUE index on `key` over finished rows (status ok or diverged) means two workers racing
  on one cell cannot both record it: the loser's insert is refused and reported as a skip;
- 'failed' rows are history: they do not block a rerun, and a later finished row replaces them.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pandas as pd

DB_NAME = "results.sqlite"
DONE = ("ok", "diverged")          # statuses that finish a cell: a rerun skips it unless forced

COLUMNS = {
    "created": "TEXT", "key": "TEXT", "cell": "TEXT", "status": "TEXT", "model": "TEXT", "solver": "TEXT",
    "solver_knobs": "TEXT", "timesteps": "TEXT", "nfe_budget": "INTEGER", "nfe": "INTEGER",
    "steps": "INTEGER", "seed": "INTEGER", "n_samples": "INTEGER", "dtype": "TEXT", "device": "TEXT",
    "final_step": "TEXT", "metrics": "TEXT", "protocols": "TEXT", "wall_time_s": "REAL",
    "sampling_time_s": "REAL", "code_version": "TEXT", "config": "TEXT",
    "sample_shape": "TEXT", "samples_path": "TEXT", "diverged_step": "INTEGER", "n_diverged": "INTEGER",
    "error": "TEXT",
}
JSON_COLUMNS = ("solver_knobs", "metrics", "protocols", "config", "sample_shape")


def db_path(results_dir) -> Path:
    return Path(results_dir) / DB_NAME


def _connect(results_dir) -> sqlite3.Connection:
    path = db_path(results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=120, isolation_level=None)   # autocommit; explicit BEGIN below
    con.execute("PRAGMA busy_timeout=120000")
    con.execute("PRAGMA journal_mode=WAL")
    cols = ", ".join(f"{k} {v}" for k, v in COLUMNS.items())
    con.execute(f"CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY AUTOINCREMENT, {cols})")
    have = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
    for k, v in COLUMNS.items():               # databases written by older code gain the new columns
        if k not in have:
            try:
                con.execute(f"ALTER TABLE runs ADD COLUMN {k} {v}")
            except sqlite3.OperationalError:   # another worker added it first
                pass
    try:
        con.execute("CREATE UNIQUE INDEX IF NOT EXISTS runs_done_key ON runs(key) "
                    "WHERE status IN ('ok', 'diverged')")
    except sqlite3.IntegrityError:             # an old database already holds duplicates: keep reading it
        pass
    return con


def _encode(row: dict) -> dict:
    row = dict(row)
    row.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
    for k in JSON_COLUMNS:
        if k in row and row[k] is not None and not isinstance(row[k], str):
            row[k] = json.dumps(row[k], sort_keys=True, default=str)
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown result columns {sorted(unknown)}")
    return row


def find_done(results_dir, key: str) -> dict | None:
    """The finished row (status ok or diverged) of a cell, or None."""
    if not db_path(results_dir).exists():
        return None
    con = _connect(results_dir)
    try:
        con.row_factory = sqlite3.Row
        r = con.execute("SELECT * FROM runs WHERE key = ? AND status IN ('ok', 'diverged') LIMIT 1", (key,)).fetchone()
        return dict(r) if r else None
    finally:
        con.close()


def record(results_dir, row: dict, force: bool = False) -> int | None:
    """Insert one row in a single transaction; returns its id, or None when the cell was already done.

    A finished row (ok/diverged) replaces the cell's failed rows, and with force=True its earlier
    finished row too, so every cell is in the table exactly once.  A failed row is only appended."""
    row = _encode(row)
    keys = list(row)
    con = _connect(results_dir)
    try:
        con.execute("BEGIN IMMEDIATE")
        try:
            if row.get("status") in DONE:
                if force:
                    con.execute("DELETE FROM runs WHERE key = ?", (row["key"],))
                else:
                    con.execute("DELETE FROM runs WHERE key = ? AND status NOT IN ('ok', 'diverged')",
                                (row["key"],))
            cur = con.execute(f"INSERT INTO runs ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
                              [row[k] for k in keys])
            con.execute("COMMIT")
            return int(cur.lastrowid)
        except sqlite3.IntegrityError:          # another worker finished this cell first
            con.execute("ROLLBACK")
            return None
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()


def append_row(results_dir, row: dict) -> int:
    """Insert one row unconditionally (kept for callers of the foundation API)."""
    rid = record(results_dir, row)
    if rid is None:
        raise sqlite3.IntegrityError(f"cell {row.get('key')} is already recorded")
    return rid


def merge(into, sources) -> tuple[int, int]:
    """Copy the rows of other stores (e.g. node-local results dirs of a cluster sweep) into `into`, with their
    saved samples; a finished cell already present is not copied again.  Returns (copied, skipped)."""
    import shutil
    copied = skipped = 0
    for src in sources:
        df = load_runs(src, expand_metrics=False)
        for r in df.to_dict("records"):
            row = {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items() if k != "id"}
            if row.get("samples_path") and (Path(src) / row["samples_path"]).exists():
                dst = Path(into) / row["samples_path"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(src) / row["samples_path"], dst)
            if record(into, row) is None:
                skipped += 1
            else:
                copied += 1
    return copied, skipped


def load_runs(results_dir, expand_metrics: bool = True) -> pd.DataFrame:
    """All runs as a DataFrame; metric columns are expanded next to the run's fields."""
    if not db_path(results_dir).exists():
        return pd.DataFrame(columns=["id", *COLUMNS])
    con = _connect(results_dir)
    try:
        df = pd.read_sql_query("SELECT * FROM runs ORDER BY id", con)
    finally:
        con.close()
    if expand_metrics and len(df):
        mets = pd.DataFrame([json.loads(m) if m else {} for m in df["metrics"]], index=df.index)
        df = pd.concat([df, mets[[c for c in mets.columns if c not in df.columns]]], axis=1)
    return df


def export(results_dir, path=None, fmt: str = "csv") -> Path:
    """Write every run to CSV or Parquet (metric columns expanded); written to a temp file, then renamed."""
    if fmt not in ("csv", "parquet"):
        from bench.models.errors import ConfigError
        raise ConfigError(f"Unknown export format '{fmt}'. Valid formats are: csv, parquet.")
    path = Path(path) if path else Path(results_dir) / f"runs.{fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    df = load_runs(results_dir)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    if fmt == "csv":
        df.to_csv(tmp, index=False)
    else:
        obj = [c for c in df.columns if df[c].dtype == object]
        df.astype({c: "string" for c in obj}).to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def export_csv(results_dir, path=None) -> Path:
    return export(results_dir, path, "csv")
