"""Validation of solver knobs: a bad value is a ConfigError naming the knob and what is allowed."""
from __future__ import annotations

from bench.models.errors import ConfigError


def check_choice(solver: str, knob: str, value, allowed):
    if value not in allowed:
        raise ConfigError(f"solver '{solver}': {knob}={value!r} is not available. "
                          f"Valid values are: {', '.join(map(str, allowed))}.")
    return value
