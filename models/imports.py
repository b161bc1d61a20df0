"""Import a user's object named 'package.module:attr' (or 'package.module.attr') with clear errors.

A user's package in the working directory is found even from the `bench` console script (which, unlike
`python -m bench`, does not put the working directory on sys.path).
"""
from __future__ import annotations

import importlib
import os
import sys

from bench.models.errors import ConfigError


def import_object(path, what: str, example: str = "my_pkg.module:function"):
    """'pkg.mod:obj' -> the object; a ConfigError naming `what` and what could not be found."""
    if not path or not isinstance(path, str):
        raise ConfigError(f"{what} needs an import path 'package.module:name', e.g. {example}; got {path!r}.")
    mod_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not mod_name or not attr:
        raise ConfigError(f"{what}: '{path}' is not an import path 'package.module:name' (e.g. {example}).")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name and mod_name.split(".")[0] == e.name.split(".")[0] and cwd not in sys.path and "" not in sys.path:
            sys.path.append(cwd)            # the user's package in the working directory
            return import_object(path, what, example)
        raise ConfigError(f"{what}: cannot import module '{mod_name}' of '{path}' ({e}).") from None
    except ImportError as e:
        raise ConfigError(f"{what}: cannot import module '{mod_name}' of '{path}' ({e}).") from None
    obj = getattr(mod, attr, None)
    if obj is None:
        raise ConfigError(f"{what}: module '{mod_name}' has no attribute '{attr}' ('{path}').")
    return obj
