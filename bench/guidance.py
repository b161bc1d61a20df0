"""Conditional sampling knobs of a run (conf/config.yaml `guidance_scale`, `labels`) and the guided eps of a batch.

Sample i asks for class label(i), a function of its index only (as its noise is), so batching, sharding and
sweep order never change which class a sample asks for:
- labels: cycle (default for conditional models): label(i) = i mod n_classes
- labels: k (an int): every sample asks for class k
- labels: [k0, k1, ...]: label(i) = list[i mod len(list)]
guidance_scale s (diffusers' convention, eps = eps_uncond + s (eps_cond - eps_uncond)): null = 1 = plain
conditional sampling; 0 = unconditional.  Either knob on an unconditional model is a ConfigError.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from bench.models.dynamics import Guided
from bench.models.errors import ConfigError


def _check_knobs(cfg: dict) -> tuple[float | None, object]:
    """Types of guidance_scale and labels, from the config alone (before any model is loaded)."""
    s, labels = cfg.get("guidance_scale"), cfg.get("labels")
    if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0):
        raise ConfigError(f"guidance_scale must be null or a finite number >= 0 (1 = plain conditional, 0 = "
                          f"unconditional, >1 = classifier-free guidance), got {s!r}")
    if labels is not None and labels != "cycle":
        items = labels if isinstance(labels, (list, tuple)) else [labels]
        if not items or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
            raise ConfigError(f"labels must be null, 'cycle', a class label (int) or a non-empty list of class "
                              f"labels, got {labels!r}")
    return (None if s is None else float(s)), (list(labels) if isinstance(labels, (list, tuple)) else labels)


def identity(cfg: dict) -> dict:
    """The guidance part of a cell's identity: {} when both knobs are at their defaults (null or s = 1 with
    cycle labels), so the keys of unconditional cells and of plain conditional cells stay as they were."""
    s, labels = _check_knobs(cfg)
    s = 1.0 if s is None else s
    labels = "cycle" if labels is None else labels
    if s == 1.0 and labels == "cycle":
        return {}
    return {"guidance": {"guidance_scale": s, "labels": labels}}


@dataclass
class Conditioning:
    """Per-sample class labels and the guidance scale of a run on a conditional model."""
    n_classes: int
    null_label: int
    guidance_scale: float = 1.0
    labels: object = "cycle"
    forwards: list = field(default_factory=list)   # network forwards per sample of each batch, counted by Guided

    def labels_of(self, indices) -> torch.Tensor:
        """The class label of each sample index (int64, shape (len(indices),))."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if self.labels == "cycle":
            return idx % self.n_classes
        if isinstance(self.labels, int):
            return torch.full_like(idx, self.labels)
        table = torch.as_tensor(self.labels, dtype=torch.long)
        return table[idx % len(table)]

    @property
    def forwards_per_eval(self) -> int:
        return 1 if self.guidance_scale in (0.0, 1.0) else 2

    def wrap(self, net, indices) -> Guided:
        """The guided eps-callable (x, t) of the samples `indices` (their labels, the null label beside them)."""
        cond = self.labels_of(indices)
        return Guided(net, cond, self.guidance_scale, torch.full_like(cond, self.null_label))

    def model_for(self, model, indices):
        """A copy of the LoadedModel whose net is the guided eps of the samples `indices` (for metrics that
        re-run the network on a set of samples: trunc's references)."""
        return dataclasses.replace(model, net=self.wrap(model.net, indices))

    def key(self) -> dict:
        return {"guidance_scale": self.guidance_scale, "labels": self.labels}


def unconditional_only(metric_names) -> list[tuple[str, str]]:
    """(name, reason) of the chosen metrics that declare they cannot score conditional samples."""
    import bench.metrics.all  # noqa: F401  (registers every metric)
    from bench.metrics import METRICS

    out = []
    for m in metric_names or []:
        reason = getattr(METRICS.get(m), "unconditional_only", None)
        if reason:
            out.append((m, reason))
    return out


def conditioning(cfg: dict, model) -> Conditioning | None:
    """The run's Conditioning (None for an unconditional model), every knob checked before any work: guidance or
    labels on an unconditional model, a label out of range, or a metric that cannot score conditional samples
    are ConfigErrors."""
    s, labels = _check_knobs(cfg)
    metrics = list(cfg.get("metrics") or [])
    if model.n_classes is None:
        if s is not None or labels is not None:
            raise ConfigError(f"model={model.name} is unconditional: guidance_scale and labels apply only to a "
                              f"conditional model (one with n_classes, e.g. model=digits_cond or model=gmm "
                              f"model.conditional=true); remove guidance_scale={s} labels={labels}.")
        if "label_acc" in metrics:
            raise ConfigError(f"metric label_acc scores conditional samples, but model={model.name} is unconditional.")
        return None
    k = model.n_classes
    if labels is not None and labels != "cycle":
        bad = [v for v in (labels if isinstance(labels, list) else [labels]) if not 0 <= v < k]
        if bad:
            raise ConfigError(f"labels {bad} out of range: model={model.name} has classes 0 .. {k - 1} "
                              f"(its null label {model.null_label} is asked for by guidance_scale=0).")
    for m, reason in unconditional_only(metrics):
        raise ConfigError(f"metric {m} cannot score model={model.name}'s conditional samples: {reason}")
    if "fid" in metrics and model.data is not None:
        raise ConfigError(f"metric fid on the conditional model={model.name}: its exact moments are those of the "
                          f"unconditional mixture, not of labelled or guided samples; use trunc and label_acc.")
    return Conditioning(k, model.null_label, 1.0 if s is None else s, "cycle" if labels is None else labels)


def of_context(ctx) -> Conditioning | None:
    """The Conditioning of a metric's run (bench.metrics.MetricContext), made once per run."""
    if "conditioning" not in ctx.cache:
        ctx.cache["conditioning"] = conditioning(ctx.cfg, ctx.model)
    return ctx.cache["conditioning"]


def model_of(ctx, indices):
    """ctx.model, or for a conditional run its copy whose net is the guided eps of the samples `indices`."""
    cond = of_context(ctx)
    return ctx.model if cond is None else cond.model_for(ctx.model, indices)
