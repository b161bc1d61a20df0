"""model=custom: a user's own eps-network by import path, with its schedule and input convention from YAML.

The factory (`package.module:function`) returns an nn.Module called as net(x, time_input) -> eps, where
time_input is what the network was trained on (conf/model/custom.yaml, key time_input):
  t      the schedule's time t times time_scale (e.g. t in [0, 1], or 999 t for a network fed 0..999)
  step   the discrete step n = (t - 1/N) N of a vp_discrete schedule with N steps (DDPM-style networks)
  sigma  the noise level sigma_hat(t) = sigma/alpha (EDM-style; equals sigma(t) for ve and edm schedules)
conf/model/custom.yaml holds neutral defaults only (kwargs and weights null, schedule keys null = the family's
default), so a user's command line or own YAML starts clean.  bench.models.helpers has a float64-safe
sinusoidal embedding and StepInput, a wrapper for networks trained on the DDPM step index.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from bench.models.errors import ConfigError
from bench.models.imports import import_object
from bench.models.netio import EpsAdapter, check_output_shape, load_state, read_checkpoint, resolve_path
from bench.models.registry import LoadedModel, register_model, schedule_from_cfg
from bench.models.schedules import VPDiscrete
from bench.models.user_data import real_data_from_cfg

TIME_INPUTS = ("t", "step", "sigma")


def import_factory(path: str):
    """'pkg.mod:fn' or 'pkg.mod.fn' -> the callable; a ConfigError naming what could not be found."""
    fn = import_object(path, "model=custom: factory", "my_pkg.nets:make_eps_net")
    if not callable(fn):
        raise ConfigError(f"model=custom: factory '{path}' is not callable.")
    return fn


def time_input_fn(name: str, schedule, time_scale: float):
    """The map from the suite's t to the network's time input; a convention that does not fit the schedule is an error."""
    if name not in TIME_INPUTS:
        raise ConfigError(f"model=custom: unknown time_input '{name}'. Valid time inputs are: {', '.join(TIME_INPUTS)}.")
    if name == "step":
        if not isinstance(schedule, VPDiscrete):
            raise ConfigError(f"model=custom: time_input 'step' (integer DDPM steps) needs a discrete schedule "
                              f"(vp_discrete, which defines the N steps); schedule '{schedule.name}' is continuous. "
                              f"Use time_input 't' (with time_scale) or 'sigma', or schedule vp_discrete.")
        n = schedule.N
        return lambda t: (t - 1.0 / n) * n
    if name == "sigma":
        return lambda t: schedule.sigma_hat(t.double()).to(t.dtype)
    return (lambda t: t * time_scale) if time_scale != 1.0 else None


@register_model("custom")
def load_custom(cfg: dict) -> LoadedModel:
    schedule = schedule_from_cfg(cfg)
    shape = tuple(int(s) for s in (cfg.get("shape") or ()))
    if not shape:
        raise ConfigError("model=custom needs 'shape': the shape of one sample, e.g. [3, 32, 32] or [2].")
    time_input = time_input_fn(cfg.get("time_input", "t"), schedule, float(cfg.get("time_scale", 1.0)))
    factory = import_factory(cfg.get("factory"))
    kwargs = cfg.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"model=custom: kwargs must be a mapping of keyword arguments of the factory, e.g. "
                          f"'model.kwargs={{hidden:64}}', got {kwargs!r}.")
    bad_kwargs = lambda e: ConfigError(f"model=custom: factory '{cfg.get('factory')}' does not take the keyword "  # noqa: E731
                                       f"arguments {kwargs} (model.kwargs): {e}")
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise bad_kwargs(e) from None
    except ValueError:      # no signature to inspect (some builtins): the call decides
        pass
    try:
        net = factory(**kwargs)
    except TypeError as e:  # a (*args, **kwargs) signature that refuses them inside, e.g. nn.Module.__init__
        if "keyword argument" not in str(e):
            raise
        raise bad_kwargs(e) from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model=custom: factory '{cfg.get('factory')}' returned {type(net).__name__}, not a torch nn.Module.")
    if cfg.get("weights"):
        path = resolve_path(cfg["weights"], "model=custom")
        state = read_checkpoint(path, "model=custom", "Expected a file written by torch.save(net.state_dict()).")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        load_state(getattr(net, "weights_target", net), state, path, "model=custom")   # a helper wrapper: its network
    net = net.eval().requires_grad_(False)
    data_range = cfg.get("data_range")
    if data_range is not None:
        if len(data_range) != 2 or not float(data_range[0]) < float(data_range[1]):
            raise ConfigError(f"model=custom: data_range must be [lo, hi] with lo < hi, got {data_range}.")
        data_range = (float(data_range[0]), float(data_range[1]))
    eps = EpsAdapter(net, time_input)
    check_output_shape(eps, shape, "model=custom", cfg.get("weights") or cfg.get("factory"), t=float(schedule.T))
    data = real_data_from_cfg(cfg, shape, data_range, cfg.get("n_levels"), cfg.get("dataset_id"), "model=custom")
    return LoadedModel("custom", eps, schedule, shape, **data, parametrization=cfg.get("parametrization") or "eps",     # real_data, feature_net, dataset_id, range, levels
                       info={"factory": cfg.get("factory"), "time_input": cfg.get("time_input", "t")})
