"""Loaders of the networks trained by our own script (models/train.py): model=digits and model=toy2d."""
from __future__ import annotations

import torch
from torch import nn

from bench.models import datasets
from bench.models.errors import ConfigError
from bench.models.netio import EpsAdapter, check_output_shape, load_state, read_checkpoint, resolve_path
from bench.models.registry import LoadedModel, register_model, schedule_from_cfg
from bench.models.unet import ARCHS


TRAIN_NAMES = {"digit_classifier": "classifier", "noisy_digit_classifier": "digits_noisy_classifier"}
"""conf/train/NAME.yaml that writes an arch whose training name differs from its data set's."""


def load_trained(path, what: str, expect_arch: str, expect_dataset: str) -> tuple[nn.Module, dict]:
    """Rebuild a network saved by models/train.py and load its weights; returns (net, training record)."""
    train_name = TRAIN_NAMES.get(expect_arch, expect_dataset)
    hint = f"Recreate it with `python -m bench.models.train {train_name}`."
    ckpt = read_checkpoint(path, what, hint)
    p = resolve_path(path, what)
    if not isinstance(ckpt, dict) or not {"arch", "arch_kwargs", "state_dict"} <= set(ckpt):
        raise ConfigError(f"{what}: '{p}' is not a checkpoint written by models/train.py (expected keys arch, "
                          f"arch_kwargs, state_dict). {hint}")
    if ckpt["arch"] != expect_arch or ckpt.get("dataset") != expect_dataset:
        raise ConfigError(f"{what}: '{p}' holds a '{ckpt['arch']}' network for data set '{ckpt.get('dataset')}'; "
                          f"expected a '{expect_arch}' network for '{expect_dataset}'.")
    net = load_state(ARCHS[expect_arch](**ckpt["arch_kwargs"]), ckpt["state_dict"], p, what)
    return net, ckpt.get("record", {})


def check_schedule(schedule, record: dict, path, what: str):
    """The YAML's schedule must be the one the network was trained under."""
    trained = record.get("schedule")
    if trained and any(abs(float(trained[k]) - float(v)) > 1e-12 if isinstance(v, (int, float)) else trained[k] != v
                       for k, v in schedule.describe().items() if k in trained and k != "T" and k != "t_min"):
        raise ConfigError(f"{what}: the network in '{path}' was trained under schedule {trained}, but the config "
                          f"asks for {schedule.describe()}; use the schedule it was trained under.")


def load_noisy_classifier(path="models/weights/digits_noisy_classifier.pt", schedule=None) -> nn.Module:
    """The noise-aware digits classifier (python -m bench.models.train digits_noisy_classifier): forward(x_t, t) ->
    logits; eval mode, weights frozen (gradients wrt x_t still flow, as classifier guidance needs).  With a
    schedule, it must be the one the classifier was trained under (ConfigError otherwise)."""
    what = "noise-aware digits classifier"
    net, record = load_trained(path, what, "noisy_digit_classifier", "digits")
    if schedule is not None:
        check_schedule(schedule, record, resolve_path(path, what), what)
    net.record = record
    return net.eval().requires_grad_(False)


def guidance_classifier_loader(cfg: dict, schedule):
    """A zero-argument loader (called when a run asks for classifier_scale) of the model's noise-aware classifier
    `guidance_classifier` as a log-potential log p_t(y | x) (bench.models.classifier), or None where the config
    names none."""
    path = cfg.get("guidance_classifier")
    if not path:
        return None
    loaded = {}

    def load():
        if "lp" not in loaded:
            from pathlib import Path

            from bench.models.classifier import ClassifierLogits

            net = load_noisy_classifier(path, schedule)
            loaded["lp"] = ClassifierLogits(net, net.n_classes, Path(str(path)).stem)
        return loaded["lp"]
    return load


class DigitFeatures(nn.Module):
    """The digits classifier as FID feature network: forward(x) = penultimate features; probs(x) = softmax."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def _in(self, x):
        p = next(self.classifier.parameters())
        return x.detach().reshape(-1, 1, 8, 8).to(p.device, p.dtype)

    def forward(self, x):
        with torch.no_grad():
            return self.classifier.features(self._in(x))

    def probs(self, x):
        with torch.no_grad():
            return torch.softmax(self.classifier(self._in(x)), dim=1)


def _load_eps_model(cfg: dict, name: str, arch: str, shape: tuple) -> tuple:
    what = f"model '{name}'"
    schedule = schedule_from_cfg(cfg)
    net, record = load_trained(cfg.get("weights"), what, arch, name)
    path = resolve_path(cfg.get("weights"), what)
    check_schedule(schedule, record, path, what)
    eps = EpsAdapter(net)
    check_output_shape(eps, shape, what, path)
    return eps, schedule, record, path


@register_model("digits")
def load_digits(cfg: dict) -> LoadedModel:
    shape = (1, 8, 8)
    eps, schedule, record, path = _load_eps_model(cfg, "digits", "unet", shape)
    classifier, crec = load_trained(cfg.get("classifier"), "model 'digits' classifier", "digit_classifier", "digits")
    info = {"weights": str(cfg.get("weights")), "train_steps": record.get("steps_done"),
            "train_loss": record.get("final_loss_ema100"), "classifier_test_accuracy": crec.get("test_accuracy")}
    return LoadedModel("digits", eps, schedule, shape, info=info, real_data=datasets.digits,
                       feature_net=DigitFeatures(classifier), dataset_id="sklearn-digits-8x8",
                       data_range=(-1.0, 1.0), n_levels=datasets.DIGITS_LEVELS,
                       guidance_classifier=guidance_classifier_loader(cfg, schedule))


class CondEpsAdapter(EpsAdapter):
    """EpsAdapter of a conditional network: raw(x, t, cond) passes the class labels through (cond=None: the
    network's null label)."""

    def raw(self, x, t, cond=None):
        if cond is None:
            return super().raw(x, t)
        t_in = self.time_input(t) if self.time_input is not None else t
        return self._net_for(x)(x, t_in.to(x.device), cond.to(x.device))

    def forward(self, x, t, cond=None):
        return self.raw(x, t, cond).to(x.dtype)


@register_model("digits_cond")
def load_digits_cond(cfg: dict) -> LoadedModel:
    """The class-conditional digits UNet (trained with label dropout: python -m bench.models.train digits_cond)."""
    shape, what = (1, 8, 8), "model 'digits_cond'"
    schedule = schedule_from_cfg(cfg)
    net, record = load_trained(cfg.get("weights"), what, "unet", "digits")
    path = resolve_path(cfg.get("weights"), what)
    if not getattr(net, "n_classes", 0):
        raise ConfigError(f"{what}: '{path}' holds an unconditional UNet; model=digits_cond needs the class-"
                          f"conditional one written by `python -m bench.models.train digits_cond`.")
    check_schedule(schedule, record, path, what)
    eps = CondEpsAdapter(net)
    check_output_shape(eps, shape, what, path)
    classifier, crec = load_trained(cfg.get("classifier"), f"{what} classifier", "digit_classifier", "digits")
    info = {"weights": str(cfg.get("weights")), "train_steps": record.get("steps_done"),
            "train_loss": record.get("final_loss_ema100"), "classifier_test_accuracy": crec.get("test_accuracy"),
            "p_uncond": (record.get("train_config") or {}).get("p_uncond")}
    return LoadedModel("digits_cond", eps, schedule, shape, info=info, real_data=datasets.digits,
                       feature_net=DigitFeatures(classifier), dataset_id="sklearn-digits-8x8",
                       data_range=(-1.0, 1.0), n_levels=datasets.DIGITS_LEVELS,
                       n_classes=net.n_classes, null_label=net.null_label,
                       guidance_classifier=guidance_classifier_loader(cfg, schedule))


@register_model("toy2d")
def load_toy2d(cfg: dict) -> LoadedModel:
    shape = (2,)
    eps, schedule, record, path = _load_eps_model(cfg, "toy2d", "mlp", shape)
    info = {"weights": str(cfg.get("weights")), "train_steps": record.get("steps_done"),
            "train_loss": record.get("final_loss_ema100")}
    return LoadedModel("toy2d", eps, schedule, shape, info=info, real_data=datasets.toy2d, dataset_id="two-moons",
                       data_range=None, n_levels=None)
