"""Per-sample randomness: sample i draws from its own stream, so it is the same whatever the batch size,
sharding or sweep order (DESIGN: one generator per sample index).

The streams are counter-based, so a draw for a whole batch is a handful of array operations (issue 17), not a
Python loop over per-sample generators:
- sample i of seed s gets the SplitMix64 stream (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number
  generators"): state_n = key_i + n gamma_i (mod 2^64), output mix64(state_n).  Its (key_i, gamma_i) are outputs
  2i+1 and 2i+2 of the SplitMix64 stream seeded with the seed's first output (the paper's `split`: a child's seed
  and gamma are two successive outputs of the parent; gamma odd, with >= 24 bit transitions as the paper
  requires), so the pair (seed, index) picks the stream and seed + index never aliases another pair (seed 1's
  sample 0 is not seed 0's sample 1).
- the n-th draw position of the stream gives one 64-bit word; its two 32-bit halves are the uniforms of one
  Box-Muller pair (Box & Muller 1958), r = sqrt(-2 log u1), theta = 2 pi u2: the first half of a draw's values
  are r cos theta, the second half r sin theta.  u1 = (k + 1/2) 2^-32 is never 0, so |z| <= 6.8.
- every sample of a PerSampleRNG draws together, so one counter (stream words used so far) serves them all, and the
  n-th draw of sample i depends only on (seed, i) and the shapes drawn before it.
The words and normals are computed with numpy on the host (uint64 arithmetic wraps as the paper's does; numpy
was 2x faster than int64 torch ops here; a (1024, 64) draw takes about one torch.randn of the batch, 207 against
221 µs in tests/bench_speed.py's test_rng_draw, 1/18 of the per-sample torch generators it replaced), in float32,
then cast and moved: a float32 run and a float64 reference see the same z, on any device.  numpy's SIMD float32
log/cos/sin may round an ulp differently on another CPU type.  A position's two normals do not depend on the shape
of the draw that uses them, so a small batch computes them ahead for several draws at once (`PerSampleRNG._refill`)
and a draw is one copy out of that buffer: the same bits as computing each draw's positions when it is made
(tests/test_rng_bits.py).

Streams of this module changed with issue 17 (they were per-sample torch generators seeded with sample_seed); the
torch generators survive as `gens` for code that hands generators to other libraries (diffusers) or draws the
metrics' own streams with them, and `sample_seed` names a seed for such a generator.
"""
from __future__ import annotations

import math

import numpy as np
import torch

GOLDEN = 0x9E3779B97F4A7C15                       # SplitMix64's default gamma (2^64 / golden ratio, odd)
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's output mix (Stafford's variant 13)
_U64 = (1 << 64) - 1
_M1_NP, _M2_NP, _S27, _S30, _S31, _S32 = (np.uint64(v) for v in (_M1, _M2, 27, 30, 31, 32))
AHEAD = 8192                  # normals a small batch's draw computes ahead, in all (PerSampleRNG._refill)


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for a torch.Generator of sample `index` (numpy's SeedSequence((seed, index)))."""
    return int(np.random.SeedSequence((int(seed), int(index))).generate_state(1, np.uint64)[0] >> 1)


def _signed(v: int) -> int:
    v &= _U64
    return v - (1 << 64) if v >> 63 else v


def mix64(z: int) -> int:
    """SplitMix64's output function on a Python int (the reference the array version is tested against)."""
    z &= _U64
    z = ((z ^ (z >> 30)) * _M1) & _U64
    z = ((z ^ (z >> 27)) * _M2) & _U64
    return z ^ (z >> 31)


def _mix64_np(z):
    """mix64 on a uint64 array, in place (array products wrap modulo 2^64 silently, as the paper's unsigned
    arithmetic does; only numpy scalars warn on overflow)."""
    z ^= z >> _S30
    z *= _M1_NP
    z ^= z >> _S27
    z *= _M2_NP
    z ^= z >> _S31
    return z


def stream_keys(seed: int, indices) -> tuple[np.ndarray, np.ndarray]:
    """(key_i, gamma_i) as uint64 arrays: outputs 2i+1, 2i+2 of SplitMix64 seeded with mix64(seed + GOLDEN)."""
    idx = np.asarray(list(indices), dtype=np.uint64)
    root = np.uint64(mix64(int(seed) + GOLDEN))
    g = np.uint64(GOLDEN)
    with np.errstate(over="ignore"):
        key = _mix64_np(root + (np.uint64(2) * idx + np.uint64(1)) * g)
        gamma = _mix64_np(root + (np.uint64(2) * idx + np.uint64(2)) * g) | np.uint64(1)
    weak = np.bitwise_count(gamma ^ (gamma >> np.uint64(1))) < 24        # too few bit transitions: flip every other bit
    gamma = np.where(weak, gamma ^ np.uint64(0xAAAAAAAAAAAAAAAA), gamma)
    return key, gamma


class PerSampleRNG:
    def __init__(self, seed: int, indices, device="cpu", dtype=torch.float32):
        self.seed, self.indices = int(seed), list(indices)
        self.device, self.dtype = device, dtype
        self._cpu = torch.device(device).type == "cpu"
        key, gamma = stream_keys(self.seed, self.indices)
        self._key, self._gamma = key[:, None], gamma[:, None]
        self._drawn = 0                                    # stream positions used so far (the same for every sample)
        self._gens = None
        # normals of stream positions _buf0 + 1 ... _buf0 + k, computed ahead of the draws (randn): (batch, k) float32
        # r cos theta and r sin theta of each position's Box-Muller pair
        self._buf0, self._cos, self._sin = 0, np.empty((len(self.indices), 0), np.float32), None
        self._ahead = 0                                    # positions computed by the last refill
        self._shapes = {}                                  # shape -> ((batch, *shape), values, pairs)

    def __len__(self):
        return len(self.indices)

    @property
    def gens(self) -> list[torch.Generator]:
        """One torch.Generator per sample, seeded with sample_seed(seed, i): for code that needs generators
        (diffusers' `generator=[...]`, the metrics' own streams).  Independent of randn's stream."""
        if self._gens is None:
            self._gens = [torch.Generator().manual_seed(sample_seed(self.seed, i)) for i in self.indices]
        return self._gens

    def randn(self, shape, dtype=None):
        """A (batch, *shape) standard normal draw; row i comes from sample i's own stream (module docstring).  The draw
        of pairs = ceil(m/2) positions takes r cos theta of each for its first `pairs` values and r sin theta for the
        rest, read from normals computed ahead for the next positions (`_refill`; the values are those of the
        positions, whatever the draw's shape, so computing them ahead changes no bit)."""
        sizes = self._shapes.get(shape if isinstance(shape, tuple) else tuple(shape))
        if sizes is None:                                                    # (b, *shape), m, pairs: once per shape
            full = (len(self.indices), *(int(s) for s in shape))
            m = math.prod(full[1:])
            sizes = self._shapes[tuple(shape)] = (full, m, (m + 1) // 2)     # one stream word per Box-Muller pair
        full, m, pairs = sizes
        j = self._drawn - self._buf0
        if j < 0 or j + pairs > self._cos.shape[1]:
            self._refill(pairs)
            j = 0
        self._drawn += pairs
        z = np.concatenate((self._cos[:, j:j + pairs], self._sin[:, j:j + m - pairs]), axis=1)   # a new array
        z = torch.from_numpy(z.reshape(full))
        dtype = dtype or self.dtype
        return z if dtype == torch.float32 and self._cpu else z.to(self.device, dtype)

    def _refill(self, pairs: int):
        """Normals of the next positions from _drawn on, at least `pairs` of them: twice as many as the last refill's
        (a run draws the same shape every step) up to AHEAD values in all, so a small batch pays numpy's per-call cost
        once per several draws and a large one computes only what it draws."""
        b = len(self.indices)
        k = max(pairs, min(2 * self._ahead, AHEAD // max(b, 1)))
        self._ahead = k
        words = self._words_at(self._drawn, k)                               # (batch, k) uint64
        # uint64 -> uint32 keeps the low half; a uint32 converts to the same float32 as the uint64 it came from (both
        # rounded to nearest once), and numpy's uint32 -> float32 is the faster cast
        r = words.astype(np.uint32).astype(np.float32)
        r += np.float32(0.5)
        r *= np.float32(2.0 ** -32)                                          # u1 = (k + 1/2) 2^-32 in (0, 1]
        np.log(r, out=r)
        r *= np.float32(-2.0)
        np.sqrt(r, out=r)                                                    # sqrt(-2 log u1)
        words >>= _S32
        theta = words.astype(np.uint32).astype(np.float32)
        theta *= np.float32(2 * math.pi * 2.0 ** -32)                        # 2 pi u2
        c = np.cos(theta)
        c *= r
        np.sin(theta, out=theta)
        theta *= r
        self._buf0, self._cos, self._sin = self._drawn, c, theta

    def words(self, count: int):
        """The next `count` 64-bit words of every sample's stream, (batch, count) uint64: mix64(key + n gamma)."""
        z = self._words_at(self._drawn, count)
        self._drawn += count
        return z

    def _words_at(self, drawn: int, count: int):
        """Words drawn + 1 ... drawn + count of every sample's stream (the counter unchanged)."""
        n = np.arange(drawn + 1, drawn + 1 + count, dtype=np.uint64)
        z = n * self._gamma
        z += self._key
        return _mix64_np(z)

    def randn_like(self, x):
        return self.randn(x.shape[1:], dtype=x.dtype)

    def increment(self, x, t_from, t_to):
        """A standard normal z standing for the Brownian increment (W(t_to) - W(t_from)) / sqrt|t_to - t_from|
        of each sample's path, in the schedule's native time t.  Solvers that discretise the reverse SDE
        draw their noise through this method, so a strong-error reference can substitute a path-consistent
        source (one Brownian path per sample on a fine grid); here it is simply a fresh draw.  t_from, t_to: numbers
        (the solvers pass their grid's Python floats) or 0-dim tensors."""
        return self.randn_like(x)


class TorchGeneratorRNG(PerSampleRNG):
    """Draws from the per-sample torch generators `gens` (one call per sample, the stream before issue 17), the
    way diffusers draws with generator=[...]: for comparing a solver with a diffusers scheduler on the same noise
    (tests/test_sde_solvers.py), not for benchmark runs, whose noise is PerSampleRNG's."""

    def randn(self, shape, dtype=None):
        z = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float64) for g in self.gens])
        return z.to(self.device, dtype or self.dtype)
