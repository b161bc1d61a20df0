"""End-of-sweep summary: a Hydra callback that reads every job's outcome file and prints cells done,
skipped, diverged and failed (with why).  Works for any launcher (basic, joblib, submitit), since
jobs report through files in the sweep directory, not through return values."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback

log = logging.getLogger("bench")


def collect(sweep_dir) -> list[dict]:
    """Outcomes of the jobs under a sweep directory (jobs killed before finishing have none)."""
    from bench.app import OUTCOME

    out = []
    for p in sorted(Path(sweep_dir).glob(f"*/{OUTCOME}"), key=lambda p: (len(p.parent.name), p.parent.name)):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            out.append({"status": "unknown", "cell": p.parent.name, "reason": "unreadable outcome file"})
    return out


def summarize(outcomes: list[dict]) -> str:
    n = Counter(o["status"] for o in outcomes)
    order = ["ok", "skipped", "diverged", "failed", "invalid", "shard"]
    head = ", ".join(f"{n[s]} {'done' if s == 'ok' else s}" for s in order if n[s] or s in ("ok", "skipped", "failed"))
    lines = [f"sweep summary: {len(outcomes)} cells: {head}"]
    for o in outcomes:
        if o["status"] in ("diverged", "failed", "invalid"):
            lines.append(f"  {o['status']}: {o['cell']}: {o.get('reason', '')}")
    return "\n".join(lines)


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        outcomes = collect(config.hydra.sweep.dir)
        text = summarize(outcomes)
        print(text, flush=True)
        (Path(config.hydra.sweep.dir) / "summary.txt").write_text(text + "\n")
