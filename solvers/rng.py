"""Per-sample randomness: sample i draws from its own generator, so it is the same whatever the
batch size, sharding or sweep order (DESIGN: one generator per sample index).

Each generator is seeded from numpy's SeedSequence((seed, index)), which keeps the streams of
different (seed, index) pairs independent (plain seed + index would make seed 1's sample 0
repeat seed 0's sample 1).
"""
from __future__ import annotations

import numpy as np
import torch


def sample_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence((int(seed), int(index))).generate_state(1, np.uint64)[0] >> 1)


class PerSampleRNG:
    def __init__(self, seed: int, indices, device="cpu", dtype=torch.float32):
        self.indices = list(indices)
        self.gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in self.indices]
        self.device, self.dtype = device, dtype

    def __len__(self):
        return len(self.gens)

    def randn(self, shape, dtype=None):
        """A (batch, *shape) standard normal draw; row i comes from sample i's own stream (drawn on CPU in float64)."""
        z = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float64) for g in self.gens])
        return z.to(self.device, dtype or self.dtype)

    def randn_like(self, x):
        return self.randn(x.shape[1:], dtype=x.dtype)

    def increment(self, x, t_from, t_to):
        """A standard normal z standing for the Brownian increment (W(t_to) - W(t_from)) / sqrt|t_to - t_from|
        of each sample's path, in the schedule's native time t.  Solvers that discretise the reverse SDE
        draw their noise through this method, so a strong-error reference can substitute a path-consistent
        source (one Brownian path per sample on a fine grid); here it is simply a fresh draw."""
        return self.randn_like(x)
