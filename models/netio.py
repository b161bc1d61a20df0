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


def net_for(net, x, copies: dict):
    """`net` itself when its weights have x's dtype and device (or it has none), else a copy of it in x's dtype and
    device, made once and kept in `copies` (float64 references of a float32 network)."""
    p = next(net.parameters(), None) if hasattr(net, "parameters") else None
    if p is None or (p.dtype == x.dtype and p.device == x.device):
        return net
    key = (x.device, x.dtype)
    if key not in copies:
        import copy
        with torch.inference_mode(False), torch.no_grad():
            copies[key] = copy.deepcopy(net).to(x.device, x.dtype)
    return copies[key]


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
        return net_for(self.net, x, self._copies)

    def _apply(self, fn, *args, **kwargs):
        self._copies = {}
        return super()._apply(fn, *args, **kwargs)

    def raw(self, x, t):
        """The network's output as it returns it (dtype unchanged)."""
        t_in = self.time_input(t) if self.time_input is not None else t
        net = self._net_for(x)
        xin = x * self.x_scale + self.x_shift if (self.x_scale != 1.0 or self.x_shift != 0.0) else x
        return net(xin, t_in.to(x.device))

    def forward(self, x, t):
        return self.raw(x, t).to(x.dtype)


_FLOAT64_OK: set = set()


def check_float64(model) -> None:
    """A float64 evaluation (the trunc metric's float64 reference, or dtype=float64) must compute in float64:
    a network that fails on float64 input or returns another dtype is a ConfigError; one whose output ignores
    changes of t or x below float32 resolution (a cast to float32 inside, often in its time embedding) gets a
    warning, since the float64 reference is then only float32-accurate.  Checked once per network, before any
    sampling; models whose network is not an EpsAdapter (the exact gmm) compute in the input's dtype already."""
    net = model.net if getattr(model, "raw_net", None) is None else model.raw_net   # the network, not EpsNet
    if not isinstance(net, EpsAdapter) or id(net) in _FLOAT64_OK:
        return
    what = f"model={model.name}"
    sch = model.schedule
    t_mid = 0.5 * (float(sch.T) + float(sch.t_min))
    x = torch.randn(2, *model.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.full((2,), t_mid, dtype=torch.float64)
    hint = ("A float64 reference (metric trunc with a deterministic solver, or dtype=float64) needs float64 "
            "throughout: look for .float() or torch.float32 in the network or its time embedding "
            "(bench.models.helpers.sinusoidal_embedding is float64-safe), or run without one (dtype=float32, "
            "metrics without trunc).")
    try:
        with torch.no_grad():
            out = net.raw(x, t)
            if out.dtype != torch.float64:
                raise ConfigError(f"{what}: the network returns {out.dtype} for float64 input. {hint}")
            lost = []
            for name, small, big in (("t", (x, t * (1 + 1e-10)), (x, t * (1 + 1e-3))),
                                     ("x", (x * (1 + 1e-10), t), (x * (1 + 1e-3), t))):
                if torch.equal(net.raw(*small), out) and not torch.equal(net.raw(*big), out):
                    lost.append(name)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001  (a dtype mismatch inside the user's network, typically)
        raise ConfigError(f"{what}: the network fails on float64 input ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}). {hint}") from None
    if lost:
        log.warning("%s: the network's float64 output does not change when %s changes below float32 resolution "
                    "(relative 1e-10) but does for larger changes: it computes in float32 somewhere on that path, so "
                    "a float64 reference (trunc) is only float32-accurate. %s", what, " or ".join(lost), hint)
    _FLOAT64_OK.add(id(net))


_COMPILED: dict = {}


_BACKENDS_OK: set = set()


def _probe_backend(backend: str):
    """Compile and run a two-op function with `backend` once per process, so that a backend that cannot work here
    (inductor without a C++ compiler) is a ConfigError before any work, not a failed cell after the set-up."""
    if backend in _BACKENDS_OK:
        return
    try:
        out = torch.compile(lambda x: x * 2.0 + 1.0, backend=backend)(torch.ones(4))
        ok = torch.equal(out, torch.full((4,), 3.0))
    except Exception as e:  # noqa: BLE001  (any failure of the compiler stack means: not usable here)
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ConfigError(f"compile: torch.compile with backend '{backend}' (compile=true is inductor) does not work here "
                          f"({type(e).__name__}: {msg}). Use compile=false, or a backend that needs no C++ compiler "
                          f"(compile=eager or aot_eager: graph capture only, no speed-up).") from None
    if not ok:
        raise ConfigError(f"compile: torch.compile with backend '{backend}' computes 2 x + 1 wrongly here; "
                          f"use compile=false.")
    _BACKENDS_OK.add(backend)


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
    _probe_backend(backend)
    key = (id(model), backend)
    if key not in _COMPILED:
        _COMPILED[key] = (model, dataclasses.replace(model, net=torch.compile(model.net, backend=backend)))
    return _COMPILED[key][1]
