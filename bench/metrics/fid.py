"""Fréchet distance between the samples and the data (Heusel et al. 2017, eq. 6):
d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2}).

Three feature spaces, picked from what the model carries:
- gmm (model.data has exact moments): raw samples against the exact data mean/cov; beside it the same
  statistic on as many exact samples (`fid_exact_samples`), the estimator's own bias at that sample count.
- model.feature_net (digits): that network's features, through torchmetrics' FrechetInceptionDistance.
- RGB/grey images without one: Inception-v3 pool features (torchmetrics + torch-fidelity), from the
  standard weights or a local weights file (`inception_weights`, offline).
- vector data without feature net (toy2d): identity features.
Reference statistics of real data are computed once and cached on disk (bench/metrics/cache.py), keyed by
data set id, feature extractor, split and reference count.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from bench.metrics import Metric, MetricContext, register_metric
from bench.metrics.cache import cached, key_hash
from bench.metrics.columns import book, quality
from bench.models.errors import ConfigError
from bench.solvers.rng import sample_seed

SPLITS = ("train", "test")
EXACT_SAMPLES_STREAM = 1 << 40     # index of the generator stream of the exact reference samples


def frechet_distance(mu1, S1, mu2, S2) -> float:
    """Closed form of the squared Fréchet (W2) distance of two Gaussians, in float64.
    Tr (S1 S2)^{1/2} = Tr (S1^{1/2} S2 S1^{1/2})^{1/2}, symmetric so eigvalsh applies."""
    mu1, S1, mu2, S2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, S1, mu2, S2))
    ev, U = torch.linalg.eigh(S1)
    r1 = (U * ev.clamp_min(0).sqrt()) @ U.T
    m = r1 @ S2 @ r1
    tr_sqrt = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(S1) + torch.trace(S2) - 2 * tr_sqrt)


def moments(x):
    """Sample mean and unbiased covariance of rows of x (flattened), float64."""
    x = x.detach().flatten(1).to("cpu", torch.float64)
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


class _Features(nn.Module):
    """Wraps a feature callable as the nn.Module torchmetrics wants, with num_features set."""

    def __init__(self, fn, num_features: int):
        super().__init__()
        self.fn, self.num_features = fn, num_features

    def forward(self, x):
        return self.fn(x).flatten(1)


def _module_hash(fn) -> str:
    if isinstance(fn, nn.Module):
        h = hashlib.sha256()
        h.update(fn.extra_repr().encode())     # what the weights do not say (a user feature net's factory and method)
        for k, v in sorted(fn.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().to("cpu", torch.float64).numpy().tobytes())
        return h.hexdigest()[:16]
    return getattr(fn, "__qualname__", type(fn).__name__)


def _file_hash(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


BOOTSTRAP_STREAM = 1 << 41        # generator stream of the bootstrap resampling


def _features(fid, imgs):
    """(features in float64, the extractor's dtype) as torchmetrics' FrechetInceptionDistance.update computes them."""
    imgs = (imgs * 255).byte() if fid.normalize and not fid.used_custom_model else imgs
    f = fid.inception(imgs)
    dt = f.dtype
    f = f.double()
    return (f.unsqueeze(0) if f.dim() == 1 else f), dt


def bootstrap_se(feats, mu_ref, cov_ref, n_boot: int, seed: int) -> float:
    """Standard error of the Frechet distance of `feats` (n, F) to a fixed reference Gaussian, by the bootstrap over
    samples (Efron 1979): the sd of the distance over n_boot resamples of the n rows with replacement.  It measures
    the sampling noise of a row's FID (what changes with the seed), not its 1/n bias, which is the same for rows of
    equal sample count; FID is a non-linear function of the sample moments, so no closed form exists."""
    if n_boot < 2 or feats.shape[0] < 3:
        return float("nan")
    x = feats.detach().flatten(1).to("cpu", torch.float64)
    g = torch.Generator().manual_seed(sample_seed(seed, BOOTSTRAP_STREAM))
    vals = [frechet_distance(*moments(x[torch.randint(0, x.shape[0], (x.shape[0],), generator=g)]), mu_ref, cov_ref)
            for _ in range(n_boot)]
    return float(torch.tensor(vals).std())


@register_metric("fid")
class FID(Metric):
    columns = (
        quality("fid", "FID", "", "fid_se", "relative", "fid", log=True, se_how="bootstrap over samples",
                floors=(("fid_real_test", "fid_real_test_n"), ("fid_exact_samples", None))),
        book("fid_se", "standard error of fid (bootstrap over samples)"),
        book("fid_n_ref", "real samples in the reference statistics", "samples"),
        book("fid_real_test", "FID of held-out real data (the floor)"),
        book("fid_real_test_n", "held-out real samples scored for the floor", "samples"),
        book("fid_exact_samples", "FID of as many exact samples (the estimator's bias)"),
    )

    def __init__(self, real_split: str = "train", n_ref: int | None = None, inception_weights: str | None = None,
                 inception_dims: int = 2048, batch_size: int = 500, bootstrap: int = 50):
        if real_split not in SPLITS:
            raise ConfigError(f"fid: real_split must be one of {', '.join(SPLITS)}, got '{real_split}'")
        if n_ref is not None and (not isinstance(n_ref, int) or n_ref < 2):
            raise ConfigError(f"fid: n_ref must be null (all real data) or an integer >= 2, got {n_ref!r}")
        if inception_weights is not None and not Path(inception_weights).is_file():
            raise ConfigError(f"fid: inception_weights file not found: '{inception_weights}'")
        if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0 or bootstrap == 1:
            raise ConfigError(f"fid: bootstrap must be 0 (no standard error) or an integer >= 2, got {bootstrap!r}")
        super().__init__(real_split=real_split, n_ref=n_ref, inception_weights=inception_weights,
                         inception_dims=inception_dims, batch_size=batch_size, bootstrap=bootstrap)

    # --- which feature space ------------------------------------------------------------------
    def _kind(self, model) -> str:
        if model.data is not None and hasattr(model.data, "cov"):
            return "exact_moments"
        if model.feature_net is not None:
            return "feature_net"
        if model.real_data is None:
            raise ConfigError(f"fid: model '{model.name}' has neither exact data moments nor real data; a custom or "
                              f"hf_ddpm model names its data with model.real_data.path (conf/model/custom.yaml)")
        if len(model.shape) == 3 and model.shape[0] in (1, 3):
            return "inception"
        return "identity"

    def _extractor(self, model):
        """(nn.Module for torchmetrics or an int feature size, extractor id)."""
        kind = self._kind(model)
        if kind == "feature_net":
            probe = torch.zeros(2, *model.shape)     # the feature count only: no read of the real data
            with torch.no_grad():
                nf = int(model.feature_net(probe).flatten(1).shape[1])
            return _Features(model.feature_net, nf), f"feature_net:{model.name}:{_module_hash(model.feature_net)}"
        if kind == "identity":
            d = int(torch.Size(model.shape).numel())
            return _Features(lambda x: x, d), f"identity:{d}"
        w = self.knobs["inception_weights"]
        return self.knobs["inception_dims"], (f"inception-v3-compat:{self.knobs['inception_dims']}:"
                                              + (f"file-{_file_hash(w)}" if w else "torchmetrics-default"))

    def _fid_module(self, model, feature):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if isinstance(feature, int):
            try:
                return FrechetInceptionDistance(feature=feature, normalize=True, reset_real_features=False,
                                                feature_extractor_weights_path=self.knobs["inception_weights"])
            except ModuleNotFoundError as e:
                raise ConfigError(f"fid: Inception features need torch-fidelity ({e}): pip install -e '.[inception]', "
                                  "with metric_cfg.fid.inception_weights=<local weights file> to stay offline; or give "
                                  "the model its own feature network (model.feature_net)") from None
            except Exception as e:  # no network and no local file: say how to run offline
                raise ConfigError(f"fid: could not load Inception-v3 weights ({type(e).__name__}: {e}); "
                                  "set metric_cfg.fid.inception_weights to a local weights file") from None
        return FrechetInceptionDistance(feature=feature, reset_real_features=False)

    def _prep(self, model, x, kind):
        """Model-space samples -> the extractor's input (Inception: RGB floats in [0, 1])."""
        if kind != "inception":
            return x.float()
        lo, hi = model.data_range or (-1.0, 1.0)
        x = ((x.float() - lo) / (hi - lo)).clamp(0, 1)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def _cell_extractor(self, ctx):
        """The extractor, built once per cell and kept in ctx.cache (setdefault would build it on every call)."""
        if "fid_extractor" not in ctx.cache:
            ctx.cache["fid_extractor"] = self._extractor(ctx.model)
        return ctx.cache["fid_extractor"]

    def _ref_key(self, ctx, ext_id):
        m = ctx.model
        return {"dataset": m.dataset_id or m.name, "extractor": ext_id, "split": self.knobs["real_split"],
                "n_ref": self.knobs["n_ref"]}

    def protocol(self, ctx):
        n = int(ctx.samples.shape[0])
        kind = self._kind(ctx.model)
        if kind == "exact_moments":
            return {"metric": "fid", "features": "identity", "reference": "exact_data_moments", "n_samples": n,
                    "estimator": "unbiased_cov", "exact_samples_stream": EXACT_SAMPLES_STREAM}
        _, ext_id = self._cell_extractor(ctx)
        key = self._ref_key(ctx, ext_id)
        return {"metric": "fid", "features": ext_id, "reference": f"real_data:{key['split']}", "n_samples": n,
                "n_ref": self.knobs["n_ref"], "ref_stats_id": key_hash(key), "estimator": "torchmetrics_fid"}

    # --- computation --------------------------------------------------------------------------
    def compute(self, ctx: MetricContext) -> dict:
        kind = self._kind(ctx.model)
        if kind == "exact_moments":
            return self._exact(ctx)
        feature, ext_id = self._cell_extractor(ctx)
        fid = self._fid_module(ctx.model, feature)
        bs = self.knobs["batch_size"]

        def real_stats():
            x = ctx.model.real_data(self.knobs["real_split"])
            x = x[: self.knobs["n_ref"]] if self.knobs["n_ref"] else x
            with torch.no_grad():
                for i in range(0, x.shape[0], bs):
                    fid.update(self._prep(ctx.model, x[i:i + bs], kind), real=True)
            return {k: getattr(fid, k).clone() for k in
                    ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")}

        stats = cached(ctx.cfg.get("results_dir", "results"), "fid_ref", self._ref_key(ctx, ext_id), real_stats)
        def feats_of(x):
            """Features of x, each image through the extractor once, as torchmetrics' update would compute them."""
            with torch.no_grad():
                fs = [_features(fid, self._prep(ctx.model, x[i:i + bs].cpu(), kind)) for i in range(0, x.shape[0], bs)]
            fid.orig_dtype = fs[0][1]
            return torch.cat([f for f, _ in fs])

        def fid_of(x=None, f=None):
            """FID against the cached real statistics (torchmetrics' compute on these features' sums)."""
            f = feats_of(x) if f is None else f
            fid.reset()
            for k, v in stats.items():
                setattr(fid, k, v.clone())
            fid.fake_features_sum = f.sum(0)
            fid.fake_features_cov_sum = f.T @ f
            fid.fake_features_num_samples = torch.tensor(f.shape[0]).long()
            fid._update_count = max(fid._update_count, 1)      # the sums above stand for update() calls
            return float(fid.compute())

        feats = feats_of(ctx.samples)
        out = {"fid": fid_of(f=feats), "fid_n_ref": int(stats["real_features_num_samples"])}
        if self.knobs["bootstrap"]:
            n_r = stats["real_features_num_samples"].double()
            mu_r = stats["real_features_sum"].double() / n_r
            cov_r = (stats["real_features_cov_sum"].double() - n_r * torch.outer(mu_r, mu_r)) / (n_r - 1)
            out["fid_se"] = bootstrap_se(feats, mu_r, cov_r, self.knobs["bootstrap"], ctx.cfg.get("seed", 0))
        if self.knobs["real_split"] == "train":
            # The floor: held-out real images scored like samples (a perfect sampler's FID at that count).
            def floor():
                x = ctx.model.real_data("test")
                return {"fid_real_test": fid_of(x), "fid_real_test_n": int(x.shape[0])}
            key = {**self._ref_key(ctx, ext_id), "floor": "real_test"}
            out.update(cached(ctx.cfg.get("results_dir", "results"), "fid_floor", key, floor))
        return out

    def _exact(self, ctx):
        gmm, n = ctx.model.data, int(ctx.samples.shape[0])
        mu, cov = gmm.mean(), gmm.cov()
        g = torch.Generator().manual_seed(sample_seed(ctx.cfg.get("seed", 0), EXACT_SAMPLES_STREAM))
        exact = gmm.sample(n, generator=g)
        out = {"fid": frechet_distance(*moments(ctx.samples), mu, cov),
               "fid_exact_samples": frechet_distance(*moments(exact), mu, cov)}
        if self.knobs["bootstrap"]:
            out["fid_se"] = bootstrap_se(ctx.samples, mu, cov, self.knobs["bootstrap"], ctx.cfg.get("seed", 0))
        return out
