import math
import random

import numpy as np
import pytest
import torch

from bench.solvers.rng import PerSampleRNG, _mix64_np, mix64, sample_seed, stream_keys


def _draws(seed, indices):
    """Two successive draws of different shapes, as a solver makes them (x_T, then a step's noise)."""
    rng = PerSampleRNG(seed, indices, dtype=torch.float64)
    a = rng.randn((3,))
    b = rng.randn_like(torch.zeros(len(indices), 2, 5, dtype=torch.float64))
    return torch.cat([a, b.flatten(1)], dim=1)


def test_sample_does_not_depend_on_batching():
    full = _draws(3, range(256))
    for size in (1, 7, 256):
        parts = torch.cat([_draws(3, range(i, min(i + size, 256))) for i in range(0, 256, size)])
        assert torch.equal(full, parts), size
    shards = torch.cat([_draws(3, range(0, 100)), _draws(3, range(100, 256))])       # two shards
    assert torch.equal(full, shards)
    assert torch.equal(_draws(3, [200, 5])[1], full[5])                                # any order of indices


def test_streams_differ_across_seeds_and_indices():
    a = PerSampleRNG(0, range(2)).randn((8,))
    b = PerSampleRNG(1, range(2)).randn((8,))
    assert not torch.equal(a[1], b[0])     # not the 'seed + index' overlap
    assert not torch.equal(a[0], a[1])


def test_splitmix64_matches_the_published_algorithm():
    """mix64 is SplitMix64's output function: the stream seeded with 1234567 starts with these words (test
    vectors of Vigna's reference splitmix64.c); the uint64 array version agrees bit for bit on random words,
    high bit set or not (its products must wrap modulo 2^64)."""
    s, out = 1234567, []
    for _ in range(3):
        s += 0x9E3779B97F4A7C15
        out.append(mix64(s))
    assert out == [6457827717110365317, 3203168211198807973, 9817491932198370423]
    words = [0, 2**63, 2**64 - 1] + [random.Random(k).getrandbits(64) for k in range(500)]
    assert _mix64_np(np.array(words, dtype=np.uint64)).tolist() == [mix64(w) for w in words]


def test_draw_is_the_sample_stream():
    """Value j < P of a draw is r cos(theta) of stream word n = drawn + 1 + j (r, theta from its 32-bit halves),
    value P + j is r sin(theta): recomputed here in Python from (key_i, gamma_i)."""
    rng = PerSampleRNG(5, [4, 9])
    rng.randn((3,))                                     # uses stream words 1, 2
    z = rng.randn((4,)).double()                        # words 3, 4: values [cos3, cos4, sin3, sin4]
    key, gamma = stream_keys(5, [4, 9])
    for row, (k, g) in enumerate(zip(key.tolist(), gamma.tolist())):
        for j, n in enumerate((3, 4)):
            h = mix64(k + n * g)
            assert h == int(PerSampleRNG(5, [[4, 9][row]]).words(n)[0, -1])
            u1 = (float(np.float32(h & 0xFFFFFFFF)) + 0.5) * 2.0 ** -32
            u2 = float(np.float32(h >> 32)) * 2.0 ** -32
            r, th = math.sqrt(-2 * math.log(u1)), 2 * math.pi * u2
            assert z[row, j].item() == pytest.approx(r * math.cos(th), abs=2e-6)
            assert z[row, 2 + j].item() == pytest.approx(r * math.sin(th), abs=2e-6)


def test_draws_are_standard_normal_and_independent():
    """256 samples x 2 draws x 2048 values: mean, variance, skewness, excess kurtosis within 5 standard errors,
    and no correlation between neighbouring samples, successive draws, the two halves of a Box-Muller pair (also
    in their squares), sample i of seeds s and s+1, or sample i+1 of seed s and sample i of seed s+1."""
    rng = PerSampleRNG(7, range(256), dtype=torch.float64)
    d1, d2 = rng.randn((2048,)), rng.randn((2048,))
    z = torch.cat([d1, d2]).flatten().numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z ** 3).mean()) < 5 * math.sqrt(15 / n)             # var(z^3) = 15
    assert abs((z ** 4).mean() - 3) < 5 * math.sqrt(96 / n)          # var(z^4) = 105 - 9

    def corr(a, b):
        a, b = a.flatten().double(), b.flatten().double()
        r = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))
        assert abs(r) < 5 / math.sqrt(a.numel()), r
    corr(d1[:-1], d1[1:])                                 # neighbouring samples
    corr(d1, d2)                                          # successive draws
    corr(d1[:, :1024], d1[:, 1024:])                      # cos and sin halves of each pair
    corr(d1[:, :1024] ** 2, d1[:, 1024:] ** 2)
    other = PerSampleRNG(8, range(256), dtype=torch.float64).randn((2048,))
    corr(d1[1:], other[:-1])                              # seed + index overlap
    corr(d1, other)                                       # neighbouring seeds, same sample


def test_float32_and_float64_draws_agree():
    a = PerSampleRNG(2, range(5), dtype=torch.float32).randn((6,))
    b = PerSampleRNG(2, range(5), dtype=torch.float64).randn((6,))
    assert torch.equal(a.double(), b)


def test_gens_are_the_per_sample_torch_generators():
    """gens (diffusers' generator list, the metrics' own streams) keep their seeds: sample_seed(seed, i)."""
    rng = PerSampleRNG(4, [2, 11])
    assert [g.initial_seed() for g in rng.gens] == [sample_seed(4, 2), sample_seed(4, 11)]


@pytest.mark.slow
def test_draws_pass_a_kolmogorov_smirnov_test():
    """The pooled values of 512 samples (two seeds' worth of streams) against N(0, 1), and the tail: the share
    beyond |z| > 3 within 5 standard errors of 2 (1 - Phi(3))."""
    from scipy import stats

    z = torch.cat([PerSampleRNG(s, range(256), dtype=torch.float64).randn((2048,)) for s in (0, 1)]).flatten()
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    p = 2 * stats.norm.sf(3)
    assert abs(float((z.abs() > 3).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / z.numel())
