"""Command line: python -m bench {run|...} [Hydra overrides].

    python -m bench run solver=heun nfe=18
    python -m bench run -m solver=euler,heun nfe=10,20      (Hydra multirun)
"""
from __future__ import annotations

import sys
from pathlib import Path

from bench import CONF_DIR as CONF
GROUPS = ("model", "solver", "timesteps", "metric_cfg")
PROG = "python -m bench run"   # argv[0] Hydra sees; "bench" from the console script (shell completion needs it)
USAGE = """usage: python -m bench COMMAND [overrides]     (or: bench COMMAND [overrides])

commands:
  run       run one benchmark cell (or a sweep with -m), e.g.  python -m bench run solver=heun nfe=18
  orders    empirical convergence order of every deterministic solver vs theory (--help for options)
  report    tables, plots and sample grids per model under results/report/
  compare   flag quality regressions against a baseline:  python -m bench compare --baseline results/baseline
  baseline  rerun the sweeps of conf/baseline.yaml and rewrite results/baseline/<model>.csv
  export    write the results store to CSV and Parquet
  merge     copy rows of other results stores (e.g. per-node ones) into this one:  python -m bench merge DIR...
  overhead  solver overhead: wall time / (counted NFE x one network forward)
  optimize-steps  time steps optimised for a model, solver and NFE (GITS or step-doubling LTE), written as a
            timesteps=explicit YAML:  python -m bench optimize-steps model=gmm solver=dpm_solver_pp nfe=6 method=gits
  orderings  the published orderings table (issue 15): 7 solvers x NFE 4-20 on gmm and digits, preferred and
            optimised time steps:  python -m bench orderings results_dir=DIR

shell completion (bash, zsh, fish):  eval "$(bench -sc install=bash)"
"""


def searchpath_dirs(args) -> list[Path]:
    """Config directories a user adds with hydra.searchpath=[file://DIR, pkg://package.conf] (Hydra's convention)."""
    dirs = []
    for a in args:
        key, _, val = a.partition("=")
        if key.lstrip("+") != "hydra.searchpath":
            continue
        for item in val.strip().strip("[]").split(","):
            item = item.strip().strip("'\"")
            if item.startswith("file://"):
                dirs.append(Path(item[len("file://"):]).expanduser())
            elif item.startswith("pkg://"):
                import importlib.util
                spec = importlib.util.find_spec(item[len("pkg://"):].replace("/", "."))
                if spec and spec.submodule_search_locations:
                    dirs.extend(Path(p) for p in spec.submodule_search_locations)
            elif item:
                dirs.append(Path(item).expanduser())
    return dirs


def group_choices(group: str, args=()) -> list[str]:
    """Names valid for a config group: YAML files in conf/GROUP/ and in the user's search path, plus solvers
    registered by installed plugin packages (entry points)."""
    names = {p.stem for d in [CONF, *searchpath_dirs(args)] for p in (d / group).glob("*.yaml")}
    if group == "solver":
        from bench.plugins import plugin_solver_names
        names |= set(plugin_solver_names())
    return sorted(names)


def check_group_choices(args) -> str | None:
    """Names chosen for config groups (model=, solver=, ...) must exist; returns an error message or None."""
    for d in searchpath_dirs(args):
        if not d.is_dir():
            return f"hydra.searchpath names '{d}', which is not a directory."
    for a in args:
        if "=" not in a or a.startswith(("+", "~", "hydra")):
            continue
        key, val = a.split("=", 1)
        key = key.removeprefix("override ").strip()
        if key not in GROUPS:
            continue
        valid = group_choices(key, args)
        val = val.strip()
        for choice in val.removeprefix("choice(").removesuffix(")").split(","):
            choice = choice.strip()
            if choice and choice not in valid:
                kind = {"timesteps": "time-step schedule", "metric_cfg": "metric config"}.get(key, key)
                return (f"Unknown {kind} '{choice}'. Valid {kind} names are: {', '.join(valid)}. "
                        f"Each is a file in conf/{key}/ (or in a directory added with "
                        f"hydra.searchpath=[file://DIR], as DIR/{key}/NAME.yaml).")
    return None


HYDRA_FLAGS_WITH_VALUE = ("--cfg", "-c", "--info", "-i", "--package", "-p", "--config-name", "-cn", "--config-path",
                          "-cp", "--config-dir", "-cd", "-sc", "--shell-completion", "--experimental-rerun")


def check_overrides(args) -> str | None:
    """Each KEY=VALUE override must parse (Hydra's grammar); results_dir must be usable before Hydra creates its
    output folder inside it.  Returns an error message or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    skip = False
    for a in args:
        if skip or a.startswith("-"):
            skip = a in HYDRA_FLAGS_WITH_VALUE and not skip
            continue
        try:
            (ov,) = parser.parse_overrides([a])
        except HydraException as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            return (f"cannot read the override '{a}' ({first}). Overrides are KEY=VALUE (nfe=18, solver=heun, "
                    f"'metrics=[fid,trunc]'); a sweep is KEY=A,B with -m; '+KEY=VALUE' adds a key, '~KEY' removes one.")
        if ov.key_or_group == "results_dir":
            from bench import fsio
            from bench.models.errors import ConfigError
            vals = list(ov.sweep_iterator()) if ov.is_sweep_override() else [ov.value()]
            for v in vals:
                try:
                    fsio.check_results_dir(v)
                except ConfigError as e:
                    return str(e)
    return None


def cmd_run(args) -> int:
    from bench.models.errors import ConfigError
    try:
        err = check_overrides(args) or check_group_choices(args)
    except ConfigError as e:
        err = str(e)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from bench.app import main
    from bench.plugins import store_plugin_configs

    store_plugin_configs()
    sys.argv = [PROG, *args]
    main()
    return 0


def shell_completion(args) -> int:
    """`bench -sc install=bash` prints Hydra's completion script for the console script; the script then calls
    `bench -sc query=bash` with COMP_LINE set, answered here: command names, or Hydra's answer for `run`."""
    import os
    line = os.environ.get("COMP_LINE", "")
    if any(a.startswith("query") for a in args):
        words = line.split()
        if len(words) <= 1 or (len(words) == 2 and not line.endswith(" ")):
            print(" ".join(COMMANDS))
            return 0
        if words[1] != "run":
            return 0
        os.environ["COMP_LINE"] = "bench " + line.split(None, 2)[2] if len(words) > 2 or line.endswith(" ") else "bench "
    from bench.app import main
    from bench.plugins import store_plugin_configs

    store_plugin_configs()
    sys.argv = ["bench", "-sc", *args]
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def key_value_args(args) -> list[str]:
    """One command-line style: `results_dir=DIR tol_fid=0.2` as `run` takes them, for the argparse commands too
    (same as --results-dir DIR --tol-fid 0.2)."""
    import re
    out = []
    for a in args:
        m = re.fullmatch(r"([a-z][a-z0-9_]*)=(.*)", a, flags=re.S)
        if m and not a.startswith("-"):
            flag, val = f"--{m.group(1).replace('_', '-')}", m.group(2)
            if val.lower() in ("true", "false"):            # switches: require_match=true
                out += [flag] if val.lower() == "true" else []
            else:
                out += [flag, val]
        else:
            out.append(a)
    return out


def _check_dirs(args) -> None:
    """--results-dir / --into of the store commands must not be files (a missing directory is just empty)."""
    from bench.models.errors import ConfigError
    for flag, val in zip(args, args[1:]):
        if flag in ("--results-dir", "--into") and Path(val).exists() and not Path(val).is_dir():
            raise ConfigError(f"{flag.lstrip('-').replace('-', '_')} '{val}' is a file, not a results directory.")


def _lazy(module, name, key_value=False):
    def cmd(args):
        import importlib

        from bench.models.errors import ConfigError
        try:
            if key_value:
                args = key_value_args(args)
                _check_dirs(args)
            return getattr(importlib.import_module(module), name)(args)
        except ConfigError as e:              # bad input: one paragraph, no traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
        except Exception as e:                # noqa: BLE001
            from bench.store import StoreError
            if isinstance(e, StoreError):
                print(f"error: {e}", file=sys.stderr)
                return 1
            raise
    return cmd


COMMANDS = {
    "run": cmd_run,
    "orders": _lazy("bench.orders", "main"),
    "report": _lazy("bench.compare", "cmd_report", key_value=True),
    "compare": _lazy("bench.compare", "cmd_compare", key_value=True),
    "baseline": _lazy("bench.compare", "cmd_baseline", key_value=True),
    "export": _lazy("bench.compare", "cmd_export", key_value=True),
    "merge": _lazy("bench.compare", "cmd_merge", key_value=True),
    "overhead": _lazy("bench.overhead", "main"),
    "optimize-steps": _lazy("bench.optimize_steps", "main"),
    "orderings": _lazy("bench.orderings", "main", key_value=True),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-sc", "--shell-completion"):
        return shell_completion(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command '{cmd}'. Valid commands are: {', '.join(COMMANDS)}.\n\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[cmd](rest)


def cli() -> None:
    """Console script `bench` (pyproject [project.scripts]): the same commands as `python -m bench`."""
    global PROG
    PROG = "bench"
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
