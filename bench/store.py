"""The results store: one SQLite database, one row per benchmark run (cell).

SQLite gives atomic appends from parallel sweep workers; `export_csv` hands the table to pandas users.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pandas as pd

DB_NAME = "results.sqlite"

COLUMNS = {
    "created": "TEXT", "key": "TEXT", "status": "TEXT", "model": "TEXT", "solver": "TEXT",
    "solver_knobs": "TEXT", "timesteps": "TEXT", "nfe_budget": "INTEGER", "nfe": "INTEGER",
    "steps": "INTEGER", "seed": "INTEGER", "n_samples": "INTEGER", "dtype": "TEXT", "device": "TEXT",
    "final_step": "TEXT", "metrics": "TEXT", "protocols": "TEXT", "wall_time_s": "REAL",
    "sampling_time_s": "REAL", "code_version": "TEXT", "config": "TEXT",
}
JSON_COLUMNS = ("solver_knobs", "metrics", "protocols", "config")


def db_path(results_dir) -> Path:
    return Path(results_dir) / DB_NAME


def _connect(results_dir) -> sqlite3.Connection:
    path = db_path(results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=60)
    con.execute("PRAGMA journal_mode=WAL")
    cols = ", ".join(f"{k} {v}" for k, v in COLUMNS.items())
    con.execute(f"CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY AUTOINCREMENT, {cols})")
    return con


def append_row(results_dir, row: dict) -> int:
    """Insert one run; returns its id.  A single transaction: a killed writer leaves no partial row."""
    row = dict(row)
    row.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
    for k in JSON_COLUMNS:
        if k in row and not isinstance(row[k], str):
            row[k] = json.dumps(row[k], sort_keys=True, default=str)
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown result columns {sorted(unknown)}")
    keys = list(row)
    with _connect(results_dir) as con:
        cur = con.execute(f"INSERT INTO runs ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
                          [row[k] for k in keys])
        return int(cur.lastrowid)


def load_runs(results_dir, expand_metrics: bool = True) -> pd.DataFrame:
    """All runs as a DataFrame; metric columns are expanded next to the run's fields."""
    if not db_path(results_dir).exists():
        return pd.DataFrame(columns=["id", *COLUMNS])
    with _connect(results_dir) as con:
        df = pd.read_sql_query("SELECT * FROM runs ORDER BY id", con)
    if expand_metrics and len(df):
        mets = pd.DataFrame([json.loads(m) if m else {} for m in df["metrics"]], index=df.index)
        df = pd.concat([df, mets[[c for c in mets.columns if c not in df.columns]]], axis=1)
    return df


def export_csv(results_dir, path=None) -> Path:
    path = Path(path) if path else Path(results_dir) / "runs.csv"
    load_runs(results_dir).to_csv(path, index=False)
    return path
