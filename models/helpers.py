"""Helpers for a user's model=custom factory: a float64-safe sinusoidal time embedding and a wrapper for
networks trained on the DDPM step index, so a factory for a typical DDPM checkpoint is a few lines:

    # my_pkg/bench_adapter.py
    from bench.models.helpers import StepInput
    from my_pkg.unet import UNet                    # called as unet(x, temb), temb = embedding of the step n

    def make_net():
        return StepInput(UNet(ch=32), embed_dim=128)   # model.weights = the UNet's own state_dict

and `model.time_input=step model.schedule.name=vp_discrete` on the command line (README, Models).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def sinusoidal_embedding(steps: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 1.0,
                         cos_first: bool = False) -> torch.Tensor:
    """(batch, dim) sinusoidal embedding of (possibly fractional) steps n (Vaswani et al. 2017, sec. 3.5), as DDPM
    embeds its step (Ho et al. 2020): with h = dim // 2 and frequencies w_k = max_period^(-k / (h - freq_shift)),
    k = 0..h-1, the embedding is [sin(n w_k), cos(n w_k)] ([cos, sin] with cos_first); an odd dim is padded
    with one zero.  freq_shift=1 is DDPM's and diffusers' default (h - 1 in the exponent's denominator);
    freq_shift=0, cos_first=True is guided-diffusion's `timestep_embedding`.

    float64-safe: computed in the dtype of `steps` when it is floating point (float64 in, float64 out), so a
    float64 reference solve keeps float64 resolution in time; integer steps give the default float dtype."""
    steps = torch.as_tensor(steps)
    dtype = steps.dtype if steps.is_floating_point() else torch.get_default_dtype()
    steps = steps.reshape(-1).to(dtype)
    half = dim // 2
    if dim < 2 or half - freq_shift <= 0:
        raise ValueError(f"sinusoidal_embedding: dim={dim} is too small for freq_shift={freq_shift}")
    k = torch.arange(half, dtype=dtype, device=steps.device)
    freqs = torch.exp(-math.log(max_period) * k / (half - freq_shift))
    arg = steps[:, None] * freqs[None, :]
    parts = (torch.cos(arg), torch.sin(arg)) if cos_first else (torch.sin(arg), torch.cos(arg))
    emb = torch.cat(parts, dim=1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class StepInput(nn.Module):
    """A network trained on the DDPM step index n = 0..N-1, called by the suite with its (fractional) step.

    With model=custom and time_input=step, the network gets n = (t - 1/N) N, which is the integer step at the
    schedule's nodes t_n = (n+1)/N and fractional between them (solvers evaluate anywhere in [t_min, T]).
    This wrapper calls
      net(x, embed(n))           with embed_dim (or embed) given: networks fed a precomputed time embedding;
                                 embed defaults to sinusoidal_embedding(n, embed_dim, **embed_kwargs)
      net(x, n)                  otherwise (networks that embed the step themselves)
    integer=True rounds n to the nearest step and passes a long tensor (networks that look their embedding up
    in a table, e.g. nn.Embedding); the ODE then sees an eps that is constant between steps, which lowers the
    solvers' orders, so prefer a network that takes fractional steps.
    model.weights load into the wrapped network (its own state_dict), not into this wrapper."""

    def __init__(self, net: nn.Module, embed_dim: int | None = None, embed: Callable | None = None,
                 integer: bool = False, **embed_kwargs):
        super().__init__()
        if embed is not None and embed_dim is not None:
            raise ValueError("StepInput: give embed_dim (sinusoidal embedding) or embed (your own), not both")
        self.net, self.integer = net, bool(integer)
        if embed is None and embed_dim is not None:
            embed = lambda n: sinusoidal_embedding(n, embed_dim, **embed_kwargs)  # noqa: E731
        self.embed = embed

    @property
    def weights_target(self) -> nn.Module:
        """The module model.weights load into (bench.models.custom)."""
        return self.net

    def forward(self, x, n):
        n = torch.as_tensor(n, device=x.device)
        if n.dim() == 0:
            n = n.expand(x.shape[0])
        if self.integer:
            n = torch.round(n).long()
        elif not n.is_floating_point():
            n = n.to(x.dtype)
        if self.embed is None:
            return self.net(x, n if self.integer else n.to(x.dtype))
        c = self.embed(n)
        if c.is_floating_point() and c.dtype != x.dtype and x.dtype != torch.float64:
            c = c.to(x.dtype)       # float32 sampling; a float64 call keeps what embed returns (check_float64)
        return self.net(x, c)
