"""What each metric writes, declared once: report and compare read only these declarations (issue 11).

A column is a quality number (with a better direction, a unit, its standard-error column and how a change is
judged) or bookkeeping (counts, notes, references), which report may show but compare never judges.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    name: str
    label: str
    unit: str = ""
    quality: bool = False             # a quality number (compared, tabled, plotted); else bookkeeping
    better: str | None = None         # "lower" | "higher" for quality columns
    se: str | None = None             # the column holding this value's standard error
    log: bool = False                 # plot on log-log axes
    order: bool = False               # an error that falls like NFE^-p: fit and show the order p
    change: str | None = None         # how compare measures a change: "relative" | "absolute" | "ratio"
    tol: str | None = None            # which tolerance of `bench compare` applies: "fid" | "nll" | "err"
    se_how: str = ""                  # how the standard error is computed, for table captions
    floors: tuple = ()                # (column, its sample-count column or None = the row's n_samples): values a
                                      # perfect sampler would get, drawn on plots at the matching sample count
    nfe_dependent: str | None = None  # protocol key whose value says the column depends on the solver (nll: solver)
    what: str = ""                    # what the number is, in words: a value, an estimate or a bound, and of what
                                      # (likelihood columns), for table captions


def quality(name, label, unit, se, change, tol, **kw) -> Column:
    return Column(name, label, unit, quality=True, better="lower", se=se, change=change, tol=tol, **kw)


def book(name, label, unit="", **kw) -> Column:
    return Column(name, label, unit, **kw)


def all_columns() -> dict[str, Column]:
    """Every declared column of every registered metric, by name."""
    import bench.metrics.all  # noqa: F401
    from bench.metrics import METRICS

    out = {}
    for cls in METRICS.values():
        for c in getattr(cls, "columns", ()):
            out[c.name] = c
    return out


def column_owner() -> dict[str, str]:
    """Column name -> the metric (registered name) that writes it."""
    import bench.metrics.all  # noqa: F401
    from bench.metrics import METRICS

    return {c.name: name for name, cls in METRICS.items() for c in getattr(cls, "columns", ())}
