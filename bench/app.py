"""The Hydra app behind `python -m bench run`: one job = one benchmark cell."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from bench import CONF_DIR as _CONF
from bench.models.errors import ConfigError

log = logging.getLogger("bench")
CONF_DIR = str(_CONF)
OUTCOME = "outcome.json"   # each job's outcome, read by bench.sweep.SweepSummary at the end of a multirun


def _job_context():
    """(is this job part of a multirun, its output directory) or (False, None) outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        hc = HydraConfig.get()
        return hc.mode == RunMode.MULTIRUN, Path(hc.runtime.output_dir)
    except Exception:  # noqa: BLE001
        return False, None


def _write_outcome(out_dir, outcome: dict) -> None:
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / OUTCOME).write_text(json.dumps(outcome, default=str))


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from bench.fastpath import cell_label, recorded

    multirun, out_dir = _job_context()
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001  (an interpolation error: the full path below reports it)
        plain = None
    done = recorded(plain) if isinstance(plain, dict) else None
    if done is not None:      # finished before with exactly this config: skipped without importing torch
        print(f"  skipped: {cell_label(done)}: {done['reason']}")
        _write_outcome(out_dir, {"status": "skipped", "cell": cell_label(done), "key": done["key"],
                                 "reason": done["reason"]})
        return
    from bench.run import format_summary, run

    overrides = []
    try:
        from hydra.core.hydra_config import HydraConfig
        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001
        pass
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
        row = run(plain)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        _write_outcome(out_dir, {"status": "invalid", "cell": " ".join(overrides), "reason": str(e)})
        if multirun:        # a sweep goes on; a single run exits 2 having recorded nothing
            return
        sys.exit(2)
    print(format_summary(row))
    if row.get("unrecorded"):
        _write_outcome(out_dir, {"status": "failed", "cell": cell_label(row), "key": row["key"],
                                 "reason": row["unrecorded"]})
        if not multirun:
            sys.exit(1)
        return
    reason = row.get("reason") or row.get("error") or (
        f"step {row.get('diverged_step')}" if row["status"] == "diverged" else "")
    _write_outcome(out_dir, {"status": row["status"], "cell": cell_label(row), "key": row["key"], "reason": reason})
    if row["status"] == "failed" and not multirun:
        sys.exit(1)
