"""diffusion-solver-bench: quality against counted NFE for diffusion-model samplers.

The only top-level import name is `bench`; the repository's `models/` and `solvers/` folders import as
`bench.models` and `bench.solvers`, and `conf/` is package data (`bench/conf` in an installed wheel).
In an installed wheel they sit inside `bench/`; in a checkout (run from the repository root, or an
editable install) they are siblings of `bench/`, found here by extending this package's search path.
"""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

_HERE = Path(__file__).resolve().parent
if not (_HERE / "models").is_dir() and (_HERE.parent / "models" / "__init__.py").is_file():
    __path__.append(str(_HERE.parent))  # noqa: F821  (checkout layout: bench.models -> ../models)

# The folder that holds conf/, models/ and solvers/: the repository root in a checkout, bench/ in a wheel.
PACKAGE_ROOT = _HERE if (_HERE / "conf").is_dir() else _HERE.parent
CONF_DIR = PACKAGE_ROOT / "conf"
# The git checkout this code runs from, or None when installed from a wheel.
REPO_ROOT = _HERE.parent if (_HERE.parent / "pyproject.toml").is_file() and PACKAGE_ROOT == _HERE.parent else None



_API = ("config", "load_model", "get_solver", "register_solver", "sample", "compute_metrics", "run_cell",
        "run_cells", "load_runs", "SampleResult", "ConfigError")


def __getattr__(name):  # the Python API (bench.api) loads on first use, so `python -m bench --help` stays fast
    if name in _API:
        import importlib
        return getattr(importlib.import_module("bench.api"), name)
    raise AttributeError(f"module 'bench' has no attribute '{name}'")
