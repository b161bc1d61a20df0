"""Metric registry.  A metric is a class registered by name; `metrics=[...]` in the config picks them.

Each metric gets its knobs from conf/metric_cfg/*.yaml (metric_cfg.<name>), writes its own columns
into the results row, and returns a protocol dict: two rows are comparable exactly when their
protocols match.  Samples are generated once per run and shared by every metric (MetricContext).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.models.errors import unknown_name


@dataclass
class MetricContext:
    cfg: dict             # the run's full config (plain dict)
    model: Any            # bench.models.registry.LoadedModel
    spec: Any             # bench.solvers.registry.SolverSpec
    knobs: dict           # solver knobs
    t: Any                # time grid used by the solver
    x_T: Any              # initial noise, (n, *shape)
    samples: Any          # solver output, (n, *shape)
    device: Any
    dtype: Any
    batch_size: int
    cache: dict = field(default_factory=dict)   # shared between metrics of one run


class Metric:
    name = "base"

    def __init__(self, **knobs):
        self.knobs = knobs

    def protocol(self, ctx: MetricContext) -> dict:
        return {"metric": self.name, **self.knobs}

    def compute(self, ctx: MetricContext) -> dict:
        raise NotImplementedError


METRICS: dict[str, type[Metric]] = {}


def register_metric(name: str):
    def deco(cls):
        cls.name = name
        METRICS[name] = cls
        return cls
    return deco


def make_metric(name: str, knobs: dict | None) -> Metric:
    import bench.metrics.all  # noqa: F401  (registers every metric)

    if name not in METRICS:
        raise unknown_name("metric", name, METRICS)
    return METRICS[name](**(knobs or {}))
