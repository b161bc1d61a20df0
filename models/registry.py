"""Model registry: a model is one loader function plus one YAML file in conf/model/.

A loader takes the model's config (a plain dict) and returns a LoadedModel. Loaded models are
cached per process, so a Hydra multirun loads weights once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from bench.models.errors import ConfigError, unknown_name
from bench.models.schedules import NoiseSchedule, make_schedule


@dataclass
class LoadedModel:
    name: str
    net: Any                      # callable eps(x, t), t of shape (batch,); runs in x's dtype and device (float64 references)
    schedule: NoiseSchedule
    shape: tuple                  # shape of one sample
    data: Any = None              # exact data distribution when known (gmm): sample, log_prob, mean, cov
    info: dict = field(default_factory=dict)
    # For data-based metrics (FID, NLL on real data); None where the model has no such data.
    real_data: Any = None         # callable(split: 'train' | 'test') -> tensor (n, *shape) in model space
    feature_net: Any = None       # callable(samples) -> (n, F) features for FID on this domain
    dataset_id: str | None = None # names the data set in cache keys of reference statistics
    data_range: tuple | None = None   # (lo, hi) of model-space data, e.g. (-1, 1) for images
    n_levels: int | None = None   # quantisation levels of the raw data (256 for 8-bit, 17 for digits)
    cfg: dict | None = None       # the config it was loaded from (set by load_model)


MODELS: dict[str, Callable[[dict], LoadedModel]] = {}
_CACHE: dict[str, LoadedModel] = {}


def register_model(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


def schedule_from_cfg(cfg: dict) -> NoiseSchedule:
    sch = dict(cfg.get("schedule") or {})
    if "name" not in sch:
        raise ConfigError("model config needs a 'schedule' with a 'name'")
    return make_schedule(sch.pop("name"), **sch)


def load_model(cfg: dict) -> LoadedModel:
    import bench.models.all  # noqa: F401  (registers every loader)

    name = cfg.get("name")
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    key = json.dumps(cfg, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = MODELS[name](cfg)
        if _CACHE[key].cfg is None:
            _CACHE[key].cfg = dict(cfg)
    return _CACHE[key]


@register_model("gmm")
def _load_gmm(cfg: dict) -> LoadedModel:
    from bench.models.gmm import GaussianMixture, GMMEps

    schedule = schedule_from_cfg(cfg)
    if cfg.get("means") is not None:
        gmm = GaussianMixture(cfg["weights"], cfg["means"], cfg["covs"])
    else:
        gmm = GaussianMixture.random(cfg.get("dim", 4), cfg.get("n_components", 3), cfg.get("seed", 0),
                                     cfg.get("mean_scale", 2.0), cfg.get("cov_min", 0.05), cfg.get("cov_max", 0.5))
    return LoadedModel("gmm", GMMEps(gmm, schedule), schedule, (gmm.dim,), data=gmm,
                       info={"dim": gmm.dim, "n_components": gmm.K, "exact": True})
