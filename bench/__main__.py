"""Command line: python -m bench {run|...} [Hydra overrides].

    python -m bench run solver=heun nfe=18
    python -m bench run -m solver=euler,heun nfe=10,20      (Hydra multirun)
"""
from __future__ import annotations

import sys
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "solver", "timesteps", "metric_cfg")
USAGE = """usage: python -m bench COMMAND [overrides]

commands:
  run       run one benchmark cell (or a sweep with -m), e.g.  python -m bench run solver=heun nfe=18
  orders    empirical convergence order of every deterministic solver vs theory (--help for options)
  report    tables, plots and sample grids per model under results/report/
  compare   flag quality regressions against a baseline:  python -m bench compare --baseline results/baseline
  baseline  rerun the sweeps of conf/baseline.yaml and rewrite results/baseline/<model>.csv
  export    write the results store to CSV and Parquet
  merge     copy rows of other results stores (e.g. per-node ones) into this one:  python -m bench merge DIR...
  overhead  solver overhead: wall time / (counted NFE x one network forward)
"""


def check_group_choices(args) -> str | None:
    """Names chosen for config groups (model=, solver=, ...) must exist; returns an error message or None."""
    for a in args:
        if "=" not in a or a.startswith(("+", "~", "hydra")):
            continue
        key, val = a.split("=", 1)
        key = key.removeprefix("override ").strip()
        if key not in GROUPS:
            continue
        valid = sorted(p.stem for p in (CONF / key).glob("*.yaml"))
        val = val.strip()
        for choice in val.removeprefix("choice(").removesuffix(")").split(","):
            choice = choice.strip()
            if choice and choice not in valid:
                kind = {"timesteps": "time-step schedule", "metric_cfg": "metric config"}.get(key, key)
                return (f"Unknown {kind} '{choice}'. Valid {kind} names are: {', '.join(valid)}. "
                        f"Each is a file in conf/{key}/.")
    return None


def cmd_run(args) -> int:
    err = check_group_choices(args)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from bench.app import main

    sys.argv = ["python -m bench run", *args]
    main()
    return 0


def _lazy(module, name):
    def cmd(args):
        import importlib
        return getattr(importlib.import_module(module), name)(args)
    return cmd


COMMANDS = {
    "run": cmd_run,
    "orders": _lazy("bench.orders", "main"),
    "report": _lazy("bench.compare", "cmd_report"),
    "compare": _lazy("bench.compare", "cmd_compare"),
    "baseline": _lazy("bench.compare", "cmd_baseline"),
    "export": _lazy("bench.compare", "cmd_export"),
    "merge": _lazy("bench.compare", "cmd_merge"),
    "overhead": _lazy("bench.overhead", "main"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command '{cmd}'. Valid commands are: {', '.join(COMMANDS)}.\n\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[cmd](rest)


if __name__ == "__main__":
    sys.exit(main())
