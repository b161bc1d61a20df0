"""Loading a network's weights with clear errors, and adapting a trained network to the suite's eps(x, t) call."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from bench.models.errors import ConfigError

from bench import PACKAGE_ROOT as ROOT  # noqa: E402  (repository root in a checkout, bench/ in a wheel)
log = logging.getLogger("models")


def resolve_path(path, what: str) -> Path:
    """Absolute path of a file named in a config: a relative path is taken from the working directory if the file
    is there, else from the package root (where the shipped `models/weights/...` live, in a checkout or a wheel)."""
    if not path:
        raise ConfigError(f"{what}: no file given; set it in the model's YAML (conf/model/).")
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return ROOT / p


def read_checkpoint(path, what: str, hint: str = "") -> dict:
    """torch.load a weights file; a missing or unreadable file is a ConfigError naming the path."""
    p = resolve_path(path, what)
    if not p.is_file():
        raise ConfigError(f"{what}: weights file '{p}' does not exist. {hint}".strip())
    log.info("loading weights %s", p)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise ConfigError(f"{what}: weights file '{p}' is corrupt or not a torch checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}). {hint}".strip()) from None


def load_state(net: nn.Module, state: dict, path, what: str) -> nn.Module:
    """Load a state dict; missing/unexpected keys or mismatched tensor shapes are a ConfigError."""
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:400]
        raise ConfigError(f"{what}: weights in '{path}' do not fit the network: {detail}") from None
    return net.eval().requires_grad_(False)


def check_output_shape(net, shape: tuple, what: str, path=None, t=0.5):
    """The eps-net must map a batch of shape (n, *shape) to the same shape."""
    x = torch.zeros(2, *shape)
    try:
        with torch.no_grad():
            out = net(x, torch.full((2,), t))
    except Exception as e:
        raise ConfigError(f"{what}: network{f' from {path}' if path else ''} fails on input of shape "
                          f"{tuple(x.shape)} (expected sample shape {tuple(shape)}): {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}") from None
    if tuple(out.shape) != tuple(x.shape):
        raise ConfigError(f"{what}: network{f' from {path}' if path else ''} returns shape {tuple(out.shape)} for "
                          f"input {tuple(x.shape)}; an eps-model must return the input's shape {tuple(x.shape)}.")


class EpsAdapter(nn.Module):
    """eps(x, t) of a trained network: maps the suite's continuous t to the network's time input, the model-space
    x to the network's data scale, and runs the network in the input's dtype and device (float64 references get
    a float64 copy of the weights, made once)."""

    def __init__(self, net: nn.Module, time_input=None, x_scale: float = 1.0, x_shift: float = 0.0):
        super().__init__()
        self.net = net
        self.time_input = time_input
        self.x_scale, self.x_shift = x_scale, x_shift
        self._copies: dict = {}

    def _net_for(self, x):
        p = next(self.net.parameters(), None)
        if p is None or (p.dtype == x.dtype and p.device == x.device):
            return self.net
        key = (x.device, x.dtype)
        if key not in self._copies:
            import copy
            with torch.inference_mode(False), torch.no_grad():
                self._copies[key] = copy.deepcopy(self.net).to(x.device, x.dtype)
        return self._copies[key]

    def _apply(self, fn, *args, **kwargs):
        self._copies = {}
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x, t):
        t_in = self.time_input(t) if self.time_input is not None else t
        net = self._net_for(x)
        xin = x * self.x_scale + self.x_shift if (self.x_scale != 1.0 or self.x_shift != 0.0) else x
        return net(xin, t_in.to(x.device)).to(x.dtype)


_COMPILED: dict = {}


def compile_model(model, backend):
    """The LoadedModel with torch.compile applied to its network, once per process; backend True = inductor."""
    import dataclasses

    if backend is False or backend is None:
        return model
    backend = "inductor" if backend is True else str(backend)
    import torch._dynamo

    valid = torch._dynamo.list_backends(exclude_tags=())
    if backend not in valid:
        raise ConfigError(f"Unknown compile backend '{backend}'. Valid values are: false, true (inductor), "
                          f"{', '.join(valid)}.")
    key = (id(model), backend)
    if key not in _COMPILED:
        _COMPILED[key] = (model, dataclasses.replace(model, net=torch.compile(model.net, backend=backend)))
    return _COMPILED[key][1]
