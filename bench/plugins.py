"""Sampler packages installed beside the suite: entry points of group `bench.solvers`.

A package declares, in its pyproject.toml,

    [project.entry-points."bench.solvers"]
    my_samplers = "my_samplers.solvers"

and that module registers its solvers with `@bench.register_solver("name", nfe="2*steps - 1", order=2)`.
Each registered solver without a YAML of its own gets a config node in Hydra's ConfigStore (group
`solver`, knobs = the function's keyword defaults), so `solver=name` works like a built-in.
"""
from __future__ import annotations

import logging
from importlib.metadata import entry_points

GROUP = "bench.solvers"
log = logging.getLogger("bench")
_LOADED: dict[str, list[str]] = {}   # entry point -> solver names it registered


def load_plugins() -> dict[str, list[str]]:
    """Import every module named by an entry point of group `bench.solvers` (once per process)."""
    if _LOADED:
        return _LOADED
    from bench.models.errors import ConfigError
    from bench.solvers.registry import SOLVERS

    _LOADED["<builtin>"] = []
    for ep in entry_points(group=GROUP):
        before = set(SOLVERS)
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001  (a broken plugin names itself; the suite still runs)
            raise ConfigError(f"solver plugin '{ep.name}' ({ep.value}, entry point group '{GROUP}') failed to "
                              f"import: {type(e).__name__}: {e}") from None
        _LOADED[ep.name] = sorted(set(SOLVERS) - before)
    return _LOADED


def plugin_solver_names() -> list[str]:
    """Solvers registered by plugin packages (not built in)."""
    if not _LOADED and not list(entry_points(group=GROUP)):
        return []        # no plugin package installed: import nothing (a rerun's fast skip stays free of torch)
    from bench.solvers import registry
    registry._load_builtins()
    return sorted(n for k, names in _LOADED.items() if k != "<builtin>" for n in names)


def store_plugin_configs() -> None:
    """Give each plugin solver a `solver/NAME` config node (its keyword defaults) in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    import inspect

    from bench import CONF_DIR
    from bench.solvers.registry import SOLVERS, knob_defaults

    cs = ConfigStore.instance()
    for name in plugin_solver_names():
        if (CONF_DIR / "solver" / f"{name}.yaml").exists():
            continue
        knobs = {k: v for k, v in knob_defaults(SOLVERS[name].fn).items() if v is not inspect.Parameter.empty}
        cs.store(group="solver", name=name, node={"name": name, **knobs})
