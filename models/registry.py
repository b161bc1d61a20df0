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
    # What the loader's network predicts (bench.models.dynamics.PARAMETRIZATIONS); load_model keeps it as raw_net and
    # sets net = EpsNet(raw_net), the eps-callable every solver and metric uses ('eps': the raw output unchanged).
    parametrization: str = "eps"
    raw_net: Any = None
    # Conditional models: net(x, t, cond) takes a class label per sample (int64, (batch,)); None = unconditional.
    n_classes: int | None = None  # number of classes (labels 0 .. n_classes-1); None = an unconditional model
    null_label: int | None = None # the label meaning "no condition" (classifier-free guidance's unconditional eps)
    # Classifier guidance (bench.guidance): the model's own log p_t(y | x) (bench.models.classifier), or a zero-argument
    # loader of it (loaded when a run asks for classifier_scale); None = none (a user's by import path still works).
    guidance_classifier: Any = None


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
    check_parametrization(cfg.get("parametrization") or "eps", f"model={name}")   # before any work (null = eps)
    key = json.dumps(cfg, sort_keys=True, default=str)
    if key not in _CACHE:
        model = MODELS[name](cfg)
        _wrap_eps(model, cfg.get("parametrization"))
        if model.cfg is None:
            model.cfg = dict(cfg)
        _CACHE[key] = model
    return _CACHE[key]


def check_parametrization(p, what: str) -> str:
    from bench.models.dynamics import PARAMETRIZATIONS

    if p not in PARAMETRIZATIONS:
        raise ConfigError(f"{what}: unknown parametrization {p!r}. Valid parametrizations (what the network "
                          f"predicts) are: {', '.join(PARAMETRIZATIONS)}.")
    return p


def _wrap_eps(model: LoadedModel, declared) -> None:
    """net becomes EpsNet(raw_net): the one place a network's output is converted to eps (models/dynamics.py)."""
    from bench.models.dynamics import EpsNet

    if model.raw_net is not None:            # wrapped already
        return
    check_parametrization(model.parametrization, f"model={model.name}")
    if declared is not None and declared != model.parametrization:
        raise ConfigError(f"model={model.name}: the config declares parametrization '{declared}', but the network "
                          f"predicts '{model.parametrization}' (what its loader reads from the checkpoint, or 'eps' "
                          f"for a model that takes no parametrization key); drop model.parametrization.")
    model.raw_net = model.net
    model.net = EpsNet(model.net, model.schedule, model.parametrization)


@register_model("gmm")
def _load_gmm(cfg: dict) -> LoadedModel:
    from bench.models.gmm import GaussianMixture, GMMEps

    schedule = schedule_from_cfg(cfg)
    if cfg.get("means") is not None:
        gmm = GaussianMixture(cfg["weights"], cfg["means"], cfg["covs"])
    else:
        gmm = GaussianMixture.random(cfg.get("dim", 4), cfg.get("n_components", 3), cfg.get("seed", 0),
                                     cfg.get("mean_scale", 2.0), cfg.get("cov_min", 0.05), cfg.get("cov_max", 0.5))
    cond = cfg.get("conditional", False)
    if not isinstance(cond, bool):
        raise ConfigError(f"gmm: conditional must be true or false, got {cond!r}")
    net = GMMEps(gmm, schedule, cond)
    from bench.models.classifier import ExactPosterior
    net.parametrization = check_parametrization(cfg.get("parametrization") or "eps", "model=gmm")
    return LoadedModel("gmm", net, schedule, (gmm.dim,), data=gmm, parametrization=net.parametrization,
                       info={"dim": gmm.dim, "n_components": gmm.K, "exact": True, "conditional": cond},
                       n_classes=gmm.K if cond else None, null_label=gmm.K if cond else None,
                       guidance_classifier=ExactPosterior(gmm, schedule))
