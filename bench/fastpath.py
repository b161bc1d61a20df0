"""What a rerun needs to skip a recorded cell without importing torch or loading a model (issue 17, item 4).

A finished row records `config_digest`: a hash of the run's whole composed config (every knob, as Hydra built it),
the bytes of a `timesteps.file` it reads, and the code version. A rerun with the same digest is the same cell
(the cell's identity is a function of exactly these), so `python -m bench run` skips it before torch is imported.
A rerun with any other knob value (even one outside the identity, e.g. progress=true) misses this index and takes
the full path, which skips it by its cell key as before.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from functools import lru_cache
from pathlib import Path

from bench import REPO_ROOT


@lru_cache(maxsize=1)
def code_version() -> str:
    """Git commit of the code; with uncommitted changes to tracked files, '-dirty-' and a hash of the diff,
    so that editing the code changes the cell keys (and a rerun does not skip stale cells).  Installed from a
    wheel (no checkout), 'v' + the package version."""
    if REPO_ROOT is None or not (REPO_ROOT / ".git").exists():
        from bench import __version__
        return f"v{__version__}"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=REPO_ROOT, capture_output=True, timeout=30).stdout
        if not rev:
            return "unknown"
        return rev + (f"-dirty-{hashlib.sha256(diff).hexdigest()[:8]}" if diff.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def config_digest(cfg: dict) -> str | None:
    """Hash of the composed config, the timesteps file it reads (its bytes) and the code version; None where the
    config cannot be hashed as it stands (then no fast skip)."""
    try:
        extra = {}
        ts = cfg.get("timesteps") or {}
        if isinstance(ts, dict) and ts.get("file"):
            extra["timesteps_file"] = hashlib.sha256(Path(ts["file"]).read_bytes()).hexdigest()
        blob = json.dumps({"cfg": cfg, **extra, "code_version": code_version()}, sort_keys=True)
    except (OSError, TypeError, ValueError):
        return None
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cell_label(row: dict) -> str:
    """One line naming a cell: model solver nfe=N seed=S."""
    knobs = "".join(f" {k}={v}" for k, v in (row.get("solver_knobs") or {}).items())
    return f"{row['model']} {row['solver']}{knobs} nfe={row['nfe_budget']} seed={row['seed']} n={row['n_samples']}"


def recorded(cfg: dict) -> dict | None:
    """The 'skipped' row of a cell already finished with exactly this config, or None (then run the full path).
    Reads the store only if it exists; never creates anything."""
    if cfg.get("force") is not False or cfg.get("shard_index") is not None:
        return None
    rd = cfg.get("results_dir")
    if not isinstance(rd, str) or not rd:
        return None
    from bench import store

    if not store.db_path(rd).is_file():
        return None
    digest = config_digest(cfg)
    if digest is None:
        return None
    try:
        done = store.find_done_by_digest(rd, digest)
    except Exception:  # noqa: BLE001  (anything odd about the store: the full path reports it properly)
        return None
    if not done:
        return None
    knobs = done.get("solver_knobs")
    knobs = json.loads(knobs) if isinstance(knobs, str) else (knobs or {})
    return {"key": done["key"], "cell": done["cell"], "model": done["model"], "solver": done["solver"],
            "solver_knobs": knobs, "timesteps": done["timesteps"], "nfe_budget": done["nfe_budget"],
            "seed": done["seed"], "n_samples": done["n_samples"], "dtype": done["dtype"],
            "code_version": done["code_version"], "status": "skipped",
            "reason": f"already recorded (run {done['id']}, {done['status']})"}
