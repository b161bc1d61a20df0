"""Conditional sampling knobs of a run (conf/config.yaml `guidance_scale`, `labels`) and the guided eps of a batch.

Sample i asks for class label(i), a function of its index only (as its noise is), so batching, sharding and
sweep order never change which class a sample asks for:
- labels: cycle (default for conditional models): label(i) = i mod n_classes
- labels: k (an int): every sample asks for class k
- labels: [k0, k1, ...]: label(i) = list[i mod len(list)]
guidance_scale s (diffusers' convention, eps = eps_uncond + s (eps_cond - eps_uncond)): null = 1 = plain
conditional sampling; 0 = unconditional.  Either knob on an unconditional model is a ConfigError, unless the run
has classifier guidance:
classifier_scale s_c (null = none): score + s_c grad_x log p_t(y | x) (Dhariwal & Nichol 2021), from `classifier`
(null = the model's own: the exact class posterior of gmm, the shipped noise-aware classifier of digits; or a
user's log-potential 'package.module:obj', bench.models.classifier).  Then every model, conditional or not, gets
labels from the classifier's classes (a label-free potential takes none).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from bench.models.dynamics import ClassifierGuided, Guided
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


def _check_classifier_knobs(cfg: dict) -> tuple[float | None, str | None]:
    """Types of classifier_scale and classifier, from the config alone."""
    cs, name = cfg.get("classifier_scale"), cfg.get("classifier")
    if cs is not None and (isinstance(cs, bool) or not isinstance(cs, (int, float)) or not math.isfinite(cs)
                           or cs < 0):
        raise ConfigError(f"classifier_scale must be null (no classifier guidance) or a finite number >= 0 (the "
                          f"scale s of score + s grad log p_t(y | x); 0 = unguided, labels still assigned), got {cs!r}")
    if name is not None and (not isinstance(name, str) or not name):
        raise ConfigError(f"classifier must be null (the model's own) or an import path 'package.module:obj', "
                          f"got {name!r}")
    if cs is None and name is not None:
        raise ConfigError(f"classifier={name} is given but classifier_scale is null: set classifier_scale (e.g. "
                          f"classifier_scale=1) to guide with it, or drop classifier.")
    return (None if cs is None else float(cs)), name


def classifier_name(cfg: dict) -> str:
    """What the cell's identity records for the guiding classifier: the import path, or the model's own (its
    weights path where it has one, else 'exact_posterior' / 'model')."""
    name = cfg.get("classifier")
    if name:
        return name
    own = (cfg.get("model") or {}).get("guidance_classifier")
    return own or ("exact_posterior" if (cfg.get("model") or {}).get("name") == "gmm" else "model")


def identity(cfg: dict) -> dict:
    """The guidance part of a cell's identity: {} when every knob is at its default (null or s = 1 with cycle
    labels, no classifier guidance), so the keys of unconditional cells and of plain conditional cells stay as
    they were."""
    s, labels = _check_knobs(cfg)
    cs, _ = _check_classifier_knobs(cfg)
    s = 1.0 if s is None else s
    labels = "cycle" if labels is None else labels
    if cs is not None:
        return {"guidance": {"guidance_scale": s, "labels": labels, "classifier_scale": cs,
                             "classifier": classifier_name(cfg)}}
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
    conditional: bool = True        # the network itself takes labels (classifier-free guidance applies)
    schedule: object = None         # the model's noise schedule (classifier guidance's sigma(t))
    classifier: object = None       # the log-potential of classifier guidance (bench.models.classifier), or None
    classifier_scale: float | None = None
    classifier_evals: list = field(default_factory=list)   # classifier evaluations per sample of each batch

    def labels_of(self, indices) -> torch.Tensor | None:
        """The class label of each sample index (int64, shape (len(indices),)); None for a label-free potential."""
        if self.n_classes is None:
            return None
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if self.labels == "cycle":
            return idx % self.n_classes
        if isinstance(self.labels, int):
            return torch.full_like(idx, self.labels)
        table = torch.as_tensor(self.labels, dtype=torch.long)
        return table[idx % len(table)]

    @property
    def forwards_per_eval(self) -> int:
        return 1 if self.guidance_scale in (0.0, 1.0) or not self.conditional else 2

    @property
    def classifier_evals_per_eval(self) -> int:
        return 0 if self.classifier is None or self.classifier_scale == 0.0 else 1

    def wrap(self, net, indices):
        """The guided eps-callable (x, t) of the samples `indices`: classifier-free guidance with their labels (the
        null label beside them) on a conditional network, then classifier guidance when the run has it."""
        cond = self.labels_of(indices)
        if self.conditional:
            net = Guided(net, cond, self.guidance_scale, torch.full_like(cond, self.null_label))
        if self.classifier is not None:
            net = ClassifierGuided(net, self.classifier, cond, self.classifier_scale, self.schedule)
        return net

    def model_for(self, model, indices):
        """A copy of the LoadedModel whose net is the guided eps of the samples `indices` (for metrics that
        re-run the network on a set of samples: trunc's references)."""
        return dataclasses.replace(model, net=self.wrap(model.net, indices))

    def key(self) -> dict:
        k = {"guidance_scale": self.guidance_scale, "labels": self.labels}
        if self.classifier is not None:
            k.update(classifier_scale=self.classifier_scale, classifier=self.classifier.name)
        return k


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


def resolve_classifier(name: str | None, model):
    """The log-potential of classifier guidance: a user's by import path, or the model's own (a ConfigError where
    the model has none)."""
    from bench.models.classifier import from_import_path, probe

    if name:
        lp = from_import_path(name)
        probe(lp, model)
        return lp
    own = getattr(model, "guidance_classifier", None)
    if own is None:
        raise ConfigError(f"classifier_scale is set but model={model.name} has no classifier for guidance (gmm has "
                          f"its exact class posterior, digits a shipped noise-aware classifier); give one by import "
                          f"path: classifier=my_pkg.module:log_potential (a callable (x, t, y) -> (batch,) or logits).")
    return own() if callable(own) and not hasattr(own, "n_classes") else own


def conditioning(cfg: dict, model) -> Conditioning | None:
    """The run's Conditioning (None for an unconditional model without classifier guidance), every knob checked
    before any work: guidance or labels on an unconditional model, a label out of range, a classifier whose classes
    differ from the model's, or a metric that cannot score conditional samples are ConfigErrors."""
    s, labels = _check_knobs(cfg)
    cs, cname = _check_classifier_knobs(cfg)
    metrics = list(cfg.get("metrics") or [])
    lp = resolve_classifier(cname, model) if cs is not None else None
    if model.n_classes is None:
        if s is not None:
            raise ConfigError(f"model={model.name} is unconditional: guidance_scale (classifier-free guidance) applies "
                              f"only to a conditional model (one with n_classes, e.g. model=digits_cond or model=gmm "
                              f"model.conditional=true); remove guidance_scale={s}, or use classifier_scale.")
        if lp is None:
            if labels is not None:
                raise ConfigError(f"model={model.name} is unconditional: labels apply only to a conditional model "
                                  f"or with classifier guidance (classifier_scale); remove labels={labels}.")
            if "label_acc" in metrics:
                raise ConfigError(f"metric label_acc scores conditional samples, but model={model.name} is "
                                  f"unconditional (and the run has no classifier guidance).")
            return None
        k = lp.n_classes
    else:
        k = model.n_classes
        if lp is not None and lp.n_classes is not None and lp.n_classes != k:
            raise ConfigError(f"classifier {lp.name} has {lp.n_classes} classes but model={model.name} has {k}.")
    if k is None:
        if labels is not None or "label_acc" in metrics:
            raise ConfigError(f"classifier={lp.name} is a label-free log-potential (no n_classes attribute): labels "
                              f"and label_acc do not apply; drop them or give the callable an n_classes.")
    elif labels is not None and labels != "cycle":
        bad = [v for v in (labels if isinstance(labels, list) else [labels]) if not 0 <= v < k]
        if bad:
            null = f" (its null label {model.null_label} is asked for by guidance_scale=0)" \
                if model.null_label is not None else ""
            raise ConfigError(f"labels {bad} out of range: the classes are 0 .. {k - 1}{null}.")
    for m, reason in unconditional_only(metrics):
        raise ConfigError(f"metric {m} cannot score model={model.name}'s conditional samples: {reason}")
    if "fid" in metrics and model.data is not None:
        raise ConfigError(f"metric fid on conditional or guided samples of model={model.name}: its exact moments are "
                          f"those of the unconditional mixture, not of labelled or guided samples; use trunc and "
                          f"label_acc.")
    return Conditioning(k, model.null_label, 1.0 if s is None else s, "cycle" if labels is None else labels,
                        conditional=model.n_classes is not None, schedule=model.schedule, classifier=lp,
                        classifier_scale=cs)


def of_context(ctx) -> Conditioning | None:
    """The Conditioning of a metric's run (bench.metrics.MetricContext), made once per run."""
    if "conditioning" not in ctx.cache:
        ctx.cache["conditioning"] = conditioning(ctx.cfg, ctx.model)
    return ctx.cache["conditioning"]


def model_of(ctx, indices):
    """ctx.model, or for a conditional run its copy whose net is the guided eps of the samples `indices`."""
    cond = of_context(ctx)
    return ctx.model if cond is None else cond.model_for(ctx.model, indices)
