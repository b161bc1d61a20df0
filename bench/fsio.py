"""Files that workers share (store, journal, caches, references, samples, shards), made safe.

- Written atomically under a unique temporary name (host, pid, random), renamed into place when complete, so
  parallel workers never read a partial file or rename each other's temporary file away.
- Read without running code: torch files with `weights_only=True`, numpy files without pickle; a file that is
  corrupt or would need pickle is refused with a clear message (callers recompute a cache entry).
- Paths built from stored values are checked to stay inside `results_dir`.
- fsync is best effort: on a disk whose fsync fails (EIO, seen on some virtual machines) it is switched off for
  the process with a one-line warning.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path

from bench.models.errors import ConfigError

log = logging.getLogger("bench")
TMP_MARK = ".tmp-"
_FSYNC = {"ok": True}


def warn_once(key: str, msg: str, _seen=set()) -> None:  # noqa: B006  (process-wide memo)
    if key not in _seen:
        _seen.add(key)
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def fsync_ok() -> bool:
    return _FSYNC["ok"]


def fsync_failed(err: BaseException) -> None:
    """Note that this disk cannot fsync; later writes skip it (durability is then the OS's)."""
    _FSYNC["ok"] = False
    warn_once("fsync", f"fsync fails on this disk ({err}); results are still written, atomically, but without "
                       f"fsync (a power cut could lose the newest ones)")


def _fsync(fd) -> None:
    if _FSYNC["ok"]:
        try:
            os.fsync(fd)
        except OSError as e:
            fsync_failed(e)


def tmp_path(path: Path) -> Path:
    """A temporary name beside `path` that no other process or thread uses."""
    return path.with_name(f"{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:10]}")


def atomic_write(path, write, sync: bool = False) -> Path:
    """write(f) into a unique temporary file beside `path`, then rename it to `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if sync:
                _fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str, sync: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()), sync=sync)


class UnsafeFile(Exception):
    """A data file that is corrupt, or that could only be read by running code (a pickle)."""


def load_torch(path, what: str):
    """torch.load with weights_only=True: tensors, numbers, strings, lists and dicts only."""
    import pickle

    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFile(f"{what} '{path}' holds objects other than tensors and plain values, so reading it "
                         f"could run code; refused ({str(e).splitlines()[0][:160]})") from None
    except Exception as e:  # noqa: BLE001  (torch raises many types for truncated or foreign files)
        raise UnsafeFile(f"{what} '{path}' is corrupt or not a torch file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None


def load_npz(path, what: str) -> dict:
    """np.load without pickle; every array read eagerly."""
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise UnsafeFile(f"{what} '{path}' is corrupt, not an npz file, or needs pickle ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None


def inside(results_dir, rel, what: str) -> Path:
    """results_dir / rel, refused unless it stays inside results_dir (no absolute paths, no '..')."""
    root = Path(results_dir).resolve()
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise ConfigError(f"{what} {rel!r} is not a relative path inside results_dir '{results_dir}'; refused.")
    p = (root / rel).resolve()
    if p != root and root not in p.parents:
        raise ConfigError(f"{what} {rel!r} points outside results_dir '{results_dir}'; refused.")
    return p


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")


def safe_name(name, what: str) -> str:
    """A name used as one path component (a model name in report/<model>/): letters, digits, _ . + = -."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ConfigError(f"{what} {name!r} cannot name a folder (allowed: letters, digits and _ . + = -, "
                          f"not starting with a dot, no '..'); refused.")
    return name


def check_results_dir(results_dir) -> Path:
    """A usable results directory: a non-empty path that is a directory (created if missing) we can write in."""
    if results_dir is None or not isinstance(results_dir, (str, os.PathLike)) or str(results_dir).strip() in (
            "", "None", "null"):
        raise ConfigError(f"results_dir must name a directory (default: results), got {results_dir!r}.")
    p = Path(results_dir).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"results_dir '{p}' exists and is not a directory; give a directory (it is created "
                          f"if missing).")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"results_dir '{p}' cannot be created: '{parent}' is a file, not a directory.")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"results_dir '{p}' cannot be created ({e.strerror or e}).") from None
    probe = tmp_path(p / ".write-probe")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"results_dir '{p}' is not writable ({e.strerror or e}); give a directory you can "
                          f"write in, e.g. results_dir=$HOME/results.") from None
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(results_dir, max_age_s: float = 24 * 3600) -> int:
    """Remove temporary files left by killed writers: ours whose process is gone (same host), and any older than
    max_age_s.  Returns how many were removed."""
    root = Path(results_dir)
    host, removed, now = socket.gethostname(), 0, time.time()
    pat = re.compile(re.escape(TMP_MARK) + r"(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]+$")
    legacy = re.compile(r"\.tmp(\d+)?$")               # names written by older versions
    for sub in ("samples", "cache", "shards", "journal", "report"):
        d = root / sub
        if not d.is_dir():
            continue
        for f in d.rglob("*"):
            if not f.is_file():
                continue
            m = pat.search(f.name)
            if not m and not legacy.search(f.name):
                continue
            try:
                age = now - f.stat().st_mtime
                dead = m is not None and m.group("host") == host and not _pid_alive(int(m.group("pid")))
                if dead or age > max_age_s or (not m and age > 600):
                    f.unlink()
                    removed += 1
            except OSError:
                pass
    return removed
