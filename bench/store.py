"""The results store: one SQLite database, one row per benchmark cell.

A cell is identified by `key` (bench.run.cell_key: model and its config, solver and knobs, time steps,
NFE budget, seed, sample count, dtype, metric protocol, code version); `cell` is the same identity
without the code version, which `bench compare` matches on across versions.

Safety under real use:
- each insert is one transaction (WAL journal): a killed writer leaves no partial row;
- a partial UNIQUE index on `key` over finished rows (status ok or diverged) means two workers racing
  on one cell cannot both record it: the loser's insert is refused and reported as a skip;
- 'failed' rows are history: they do not block a rerun, and a later finished row replaces them;
- the store is opened (and created) before any compute, so a directory that cannot hold it fails at once;
- a row is first written to a journal file (results_dir/journal/, atomically, locked while its writer inserts
  it, so a concurrent worker's replay never takes a row in flight), then inserted; if the insert
  fails (a locked, full or failing disk), the journal keeps the row and the next run or `bench merge`
  records it, so a computed result is never lost;
- on a disk whose fsync fails (EIO) the database falls back to synchronous=OFF with a one-line warning.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

try:
    import fcntl
except ImportError:                             # not POSIX: no in-flight marks, replay as before
    fcntl = None


from bench import fsio
from bench.models.errors import ConfigError

DB_NAME = "results.sqlite"
DONE = ("ok", "diverged")          # statuses that finish a cell: a rerun skips it unless forced

COLUMNS = {
    "created": "TEXT", "key": "TEXT", "cell": "TEXT", "status": "TEXT", "model": "TEXT", "solver": "TEXT",
    "solver_knobs": "TEXT", "timesteps": "TEXT", "nfe_budget": "INTEGER", "nfe": "INTEGER",
    "steps": "INTEGER", "seed": "INTEGER", "n_samples": "INTEGER", "dtype": "TEXT", "device": "TEXT",
    "final_step": "TEXT", "metrics": "TEXT", "protocols": "TEXT", "wall_time_s": "REAL",
    "sampling_time_s": "REAL", "code_version": "TEXT", "config": "TEXT",
    "sample_shape": "TEXT", "samples_path": "TEXT", "diverged_step": "INTEGER", "n_diverged": "INTEGER",
    "error": "TEXT", "nfe_batches": "TEXT",
    "guidance_scale": "REAL",    # conditional models: classifier-free guidance scale s (1 = plain conditional)
    "nfe_forwards": "INTEGER",   # conditional models: network forwards per sample (2 x nfe when s is not 0 or 1)
    "setup_time_s": "REAL",      # seconds building the per-sample generators and x_T, outside sampling_time_s
    "classifier_scale": "REAL",  # classifier guidance scale s (score + s grad log p_t(y | x)); null = none
    "classifier": "TEXT",        # the guiding log-potential: exact_posterior, a shipped classifier, or an import path
    "classifier_evals": "INTEGER",  # classifier evaluations (forward + input gradient) per sample, not in nfe
    "config_digest": "TEXT",     # hash of the whole composed config + code version: a rerun's fast skip (bench.fastpath)
}
JSON_COLUMNS = ("solver_knobs", "metrics", "protocols", "config", "sample_shape", "nfe_batches")


def db_path(results_dir) -> Path:
    return Path(results_dir) / DB_NAME


class StoreError(Exception):
    """The results store cannot be written (disk I/O, full disk, lock timeout): the journal keeps the row."""


def _is_io_error(e: BaseException) -> bool:
    return isinstance(e, sqlite3.OperationalError) and "disk i/o error" in str(e).lower()


def _connect(results_dir) -> sqlite3.Connection:
    """A connection with the schema in place; falls back to synchronous=OFF where fsync fails."""
    try:
        try:
            return _open(results_dir)
        except sqlite3.OperationalError as e:
            if not _is_io_error(e) or not fsio.fsync_ok():
                raise
            fsio.fsync_failed(e)                    # the disk cannot fsync: same database, no fsync
            return _open(results_dir)
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError):
            raise
        raise ConfigError(f"the results store '{db_path(results_dir)}' is corrupt or not an SQLite database "
                          f"({e}). Move it away or choose another results_dir.") from None


def _open(results_dir) -> sqlite3.Connection:
    path = db_path(results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=120, isolation_level=None)   # autocommit; explicit BEGIN below
    try:
        return _setup(con, path)
    except BaseException:
        con.close()
        raise


def _setup(con, path) -> sqlite3.Connection:
    con.execute("PRAGMA busy_timeout=120000")
    if not fsio.fsync_ok():
        con.execute("PRAGMA synchronous=OFF")
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}   # read-only check
    if "runs" in tables:
        have = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
        if not {"id", "key", "status"} <= have:
            raise ConfigError(f"'{path}' has a table 'runs' that is not this suite's (columns: "
                              f"{', '.join(sorted(have))}); move the file away or choose another results_dir.")
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
        con.execute("CREATE INDEX IF NOT EXISTS runs_config_digest ON runs(config_digest)")
    except sqlite3.OperationalError:
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


def open_store(results_dir) -> Path:
    """Check results_dir, create or open its store, record rows left in the journal and remove stale temporary
    files: the first thing a run does, before any compute.  Bad directories and foreign or corrupt databases are
    ConfigErrors; a disk that cannot be written at all is a ConfigError too."""
    root = fsio.check_results_dir(results_dir)
    try:
        _connect(root).close()
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"the results store '{db_path(root)}' cannot be opened ({e}). If it is corrupt, move it "
                          f"away (its rows can be re-imported with `bench merge` if readable) or choose another "
                          f"results_dir.") from None
    replay_journal(root)
    fsio.clean_stale_tmp(root)
    return root


JOURNAL = "journal"


def journal_write(results_dir, row: dict) -> Path:
    """Write a row to results_dir/journal/ (atomic, fsync where possible) before it is inserted."""
    path, fd = _journal_open(results_dir, row)
    _unlock(fd)
    return path


def _journal_open(results_dir, row: dict) -> tuple[Path, int | None]:
    """journal_write, returning the file with an exclusive lock held (an fd) that marks it as in flight: a
    concurrent worker's replay leaves a locked file alone, so only rows whose writer died or gave up are
    replayed.  The lock is taken on the temporary file before it is renamed into place."""
    path = Path(results_dir) / JOURNAL / f"{row['key']}-{os.getpid()}-{time.time_ns()}.json"
    fd = None

    def write(f):
        nonlocal fd
        f.write(json.dumps(_encode(row), sort_keys=True, default=str).encode())
        fd = os.dup(f.fileno())
        _lock(fd, block=True)

    try:
        fsio.atomic_write(path, write, sync=True)
    except BaseException:
        _unlock(fd)
        raise
    return path, fd


def _lock(fd, block: bool) -> bool:
    """An exclusive advisory lock on fd; False when another process holds it (non-blocking)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


def _unlock(fd) -> None:
    if fd is not None:
        os.close(fd)                            # closing the last descriptor releases the lock


def replay_journal(results_dir) -> int:
    """Record the rows that a run computed but could not insert; returns how many were recorded."""
    d = Path(results_dir) / JOURNAL
    if not d.is_dir():
        return 0
    done = 0
    for f in sorted(d.glob("*.json")):
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:                           # recorded (or claimed) meanwhile
            continue
        try:
            if not _lock(fd, block=False):        # its writer is still inserting it: not ours to replay
                continue
            claimed = f.with_name(f.name + fsio.TMP_MARK + f"claim-{os.getpid()}")
            try:
                os.rename(f, claimed)             # one replayer per file
            except OSError:
                continue
        finally:
            os.close(fd)
        try:
            row = json.loads(claimed.read_text())
            row = {k: v for k, v in row.items() if k in COLUMNS}
            record(results_dir, row, journal=False)
            done += 1
            claimed.unlink()
        except (OSError, ValueError, sqlite3.Error, StoreError) as e:
            os.rename(claimed, f)                  # keep it for the next replay
            fsio.warn_once(f"journal:{f}", f"journal row {f} could not be recorded yet ({e})")
    if done:
        fsio.warn_once(f"replayed:{results_dir}", f"recorded {done} row(s) from {d} that an earlier run had "
                                                  f"computed but could not write to the store")
    return done


def _find_finished(results_dir, column: str, value: str) -> dict | None:
    """The newest finished row (status ok or diverged) whose `column` is `value`, or None; never creates a store."""
    if not db_path(results_dir).exists():
        return None
    con = _connect(results_dir)
    try:
        con.row_factory = sqlite3.Row
        r = con.execute(f"SELECT * FROM runs WHERE {column} = ? AND status IN ('ok', 'diverged') "
                        f"ORDER BY id DESC LIMIT 1", (value,)).fetchone()
        return dict(r) if r else None
    finally:
        con.close()


def find_done(results_dir, key: str) -> dict | None:
    """The finished row (status ok or diverged) of a cell, or None."""
    return _find_finished(results_dir, "key", key)


def find_done_by_digest(results_dir, digest: str) -> dict | None:
    """The finished row recorded with this config_digest (bench.fastpath), or None."""
    return _find_finished(results_dir, "config_digest", digest)


def record(results_dir, row: dict, force: bool = False, journal: bool = True) -> int | None:
    """Insert one row in a single transaction; returns its id, or None when the cell was already done.

    A finished row (ok/diverged) replaces the cell's failed rows, and with force=True its earlier
    finished row too, so every cell is in the table exactly once.  A failed row is only appended.
    With journal=True the row is written to the journal first and removed from it once committed; if the
    insert fails, StoreError names the journal file that keeps it."""
    row = _encode(row)
    jpath = jfd = None
    if journal:
        try:
            jpath, jfd = _journal_open(results_dir, row)
        except OSError as e:
            fsio.warn_once(f"journal-write:{results_dir}", f"cannot write the journal in {results_dir} ({e})")
    try:
        rid = _insert_or_keep(results_dir, row, force, jpath)
        if jpath is not None:
            jpath.unlink(missing_ok=True)
    finally:
        _unlock(jfd)                            # a kept row becomes replayable once its lock is released
    return rid


def _insert_or_keep(results_dir, row: dict, force: bool, jpath) -> int | None:
    try:
        rid = _insert(results_dir, row, force)
    except sqlite3.OperationalError as e:
        if _is_io_error(e) and fsio.fsync_ok():
            fsio.fsync_failed(e)
            try:
                rid = _insert(results_dir, row, force)
            except sqlite3.Error as e2:
                raise StoreError(_kept(e2, jpath)) from None
        else:
            raise StoreError(_kept(e, jpath)) from None
    except sqlite3.Error as e:
        raise StoreError(_kept(e, jpath)) from None
    return rid


def _kept(e, jpath) -> str:
    where = f"; the row is kept in {jpath} and the next run (or `bench merge`) records it" if jpath else ""
    return f"the results store could not be written ({type(e).__name__}: {e}){where}"


def _insert(results_dir, row: dict, force: bool) -> int | None:
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
    open_store(into)
    copied = skipped = 0
    for src in sources:
        if not db_path(src).is_file() and not (Path(src) / JOURNAL).is_dir():
            raise ConfigError(f"merge source '{src}' holds no results store ({DB_NAME}) and no journal.")
        df = load_runs(src, expand_metrics=False)
        records = df.to_dict("records") + [json.loads(f.read_text()) for f in sorted((Path(src) / JOURNAL).glob(
            "*.json"))]
        for r in records:
            extra = sorted(set(r) - set(COLUMNS) - {"id"})
            if extra:
                fsio.warn_once(f"merge-extra:{src}", f"merge source '{src}' has columns this version does not "
                                                     f"know ({', '.join(extra)}); they are not copied")
            row = {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items() if k in COLUMNS}
            rel = row.get("samples_path")
            if rel:
                row["samples_path"] = None
                if rel == f"samples/{row.get('key')}.npz" and fsio.NAME_RE.fullmatch(str(row.get("key"))):
                    src_file = fsio.inside(src, rel, "samples_path of a merged row")
                    if src_file.is_file():
                        fsio.atomic_write(fsio.inside(into, rel, "samples_path"),
                                          lambda f, s=src_file: f.write(s.read_bytes()))
                        row["samples_path"] = rel
                else:
                    fsio.warn_once(f"merge-path:{src}:{rel}", f"merge: row {row.get('key')} of '{src}' has "
                                   f"samples_path {rel!r}, not samples/<key>.npz; its samples are not copied")
            if record(into, row) is None:
                skipped += 1
            else:
                copied += 1
    return copied, skipped


def load_runs(results_dir, expand_metrics: bool = True) -> "pd.DataFrame":
    import pandas as pd                 # deferred: a run that skips a recorded cell never needs it

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
