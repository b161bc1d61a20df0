"""Path-consistent noise for strong-error references: one Brownian path per sample on a fine grid.

BrownianRNG has PerSampleRNG's interface (randn, randn_like draw from the same per-sample streams, so
x_T is unchanged), but increment(x, t_from, t_to) returns the normalised increment
(W(t_to) - W(t_from)) / sqrt|t_to - t_from| of sample i's own path, given on `fine_times`.  The path's
increment over fine interval k is sqrt|dt_k| z_{i,k} with z_{i,k} drawn from a generator seeded from
(seed, index, k), so a coarse step sums exactly the fine increments it covers (the coupling of strong
error estimates, Kloeden & Platen 1992, sec. 9.3) and nothing is stored.
"""
from __future__ import annotations

import numpy as np
import torch

from bench.solvers.rng import PerSampleRNG

PATH_TAG = 1    # separates path streams (seed, index, 1, k) from the sample's randn stream (seed, index)


class BrownianRNG(PerSampleRNG):
    def __init__(self, seed: int, indices, fine_times, device="cpu", dtype=torch.float32):
        super().__init__(seed, indices, device=device, dtype=dtype)
        self.seed = int(seed)
        self.fine_times = torch.as_tensor(fine_times, dtype=torch.float64).cpu()

    def _index(self, t) -> int:
        t = float(t)
        d = (self.fine_times - t).abs()
        k = int(torch.argmin(d))
        if d[k] > 1e-9 * max(1.0, abs(t)):
            raise ValueError(f"BrownianRNG: time {t} is not on the fine grid the path is defined on")
        return k

    def _z(self, index: int, k: int, shape):
        s = int(np.random.SeedSequence((self.seed, int(index), PATH_TAG, k)).generate_state(1, np.uint64)[0] >> 1)
        return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s), dtype=torch.float64)

    def increment(self, x, t_from, t_to):
        a, b = self._index(t_from), self._index(t_to)
        lo, hi = min(a, b), max(a, b)
        dt = (self.fine_times[lo + 1:hi + 1] - self.fine_times[lo:hi]).abs()
        if hi == lo:
            return torch.zeros_like(x)
        w = torch.stack([sum(float(dt[j].sqrt()) * self._z(i, lo + j, x.shape[1:]) for j in range(hi - lo))
                         for i in self.indices])
        z = w / float(dt.sum().sqrt())
        return (z if a < b else -z).to(x.device, x.dtype)


def refine_grid(t, refine: int):
    """Each interval of the grid t split into `refine` equal pieces in t; contains t itself."""
    t = torch.as_tensor(t, dtype=torch.float64)
    pieces = [t[n] + (t[n + 1] - t[n]) * torch.arange(refine, dtype=torch.float64) / refine for n in range(len(t) - 1)]
    return torch.cat([*pieces, t[-1:]])
