import torch

from bench.solvers.rng import PerSampleRNG


def test_sample_does_not_depend_on_batching():
    full = PerSampleRNG(3, range(10)).randn((4,))
    parts = torch.cat([PerSampleRNG(3, range(0, 3)).randn((4,)), PerSampleRNG(3, range(3, 10)).randn((4,))])
    assert torch.equal(full, parts)


def test_streams_differ_across_seeds_and_indices():
    a = PerSampleRNG(0, range(2)).randn((8,))
    b = PerSampleRNG(1, range(2)).randn((8,))
    assert not torch.equal(a[1], b[0])     # not the 'seed + index' overlap
    assert not torch.equal(a[0], a[1])
