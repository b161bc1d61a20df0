"""Throwaway models for metric tests: an 'image' model with real data, a feature net and an exact density."""
import torch
from torch import nn

from bench.metrics import MetricContext
from bench.models.gmm import GaussianMixture, GMMEps
from bench.models.registry import LoadedModel
from bench.models.schedules import make_schedule
from bench.solvers.registry import get_solver


class FlatEps(nn.Module):
    """An exact GMM eps-model acting on (n, C, H, W) tensors."""

    def __init__(self, gmm, schedule):
        super().__init__()
        self.inner = GMMEps(gmm, schedule)

    def forward(self, x, t):
        return self.inner(x.flatten(1), t).reshape(x.shape)


class CountingFeatures(nn.Module):
    def __init__(self, d_in, d_out=6):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d_in, d_out)
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return torch.tanh(self.lin(x.flatten(1).float()))


def tiny_image_model(shape=(1, 2, 2), levels=17, n_real=400, feature_net=True):
    """Data: a Gaussian in model space [-1, 1] quantised to `levels` levels; eps is the exact one of the Gaussian."""
    d = int(torch.Size(shape).numel())
    gmm = GaussianMixture([1.0], [[0.0] * d], [(0.15 * torch.eye(d)).tolist()])
    sch = make_schedule("vp_linear")
    g = torch.Generator().manual_seed(1)

    def real_data(split):
        x = gmm.sample(n_real, generator=torch.Generator().manual_seed(0 if split == "train" else 1))
        k = torch.round((x.clamp(-1, 1) + 1) / 2 * (levels - 1))
        return (2 * k / (levels - 1) - 1).float().reshape(-1, *shape)

    del g
    fnet = CountingFeatures(d) if feature_net else None
    return LoadedModel("tiny", FlatEps(gmm, sch), sch, tuple(shape), data=None, real_data=real_data,
                       feature_net=fnet, dataset_id=f"tiny-{levels}", data_range=(-1.0, 1.0), n_levels=levels), gmm


def make_ctx(model, samples, results_dir, solver="heun", t=None, x_T=None, seed=0, cfg_model=None, knobs=None):
    return MetricContext(cfg={"seed": seed, "results_dir": str(results_dir), "model": cfg_model or {"name": model.name}},
                         model=model, spec=get_solver(solver), knobs=knobs or {}, t=t, x_T=x_T, samples=samples,
                         device=torch.device("cpu"), dtype=samples.dtype, batch_size=1000)
