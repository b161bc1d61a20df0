"""Exact analytic epsilon-model: data from a Gaussian mixture.

If x_0 ~ sum_k pi_k N(mu_k, S_k) then x_t = alpha x_0 + sigma eps has the closed-form marginal
q_t(x) = sum_k pi_k N(x; alpha mu_k, alpha^2 S_k + sigma^2 I), so the optimal epsilon-prediction
eps*(x, t) = -sigma grad log q_t(x) (Song et al. 2021, eq. 5 with Tweedie's formula) is exact.
Each S_k = U_k diag(s_k) U_k^T is kept in eigen-form so any (alpha, sigma), per sample, costs O(K d^2).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from bench.models.errors import ConfigError


class GaussianMixture:
    """Mixture parameters in float64 with exact log-density, sampling and moments at any noise level."""

    def __init__(self, weights, means, covs):
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        self.means = torch.as_tensor(np.asarray(means, dtype=np.float64))
        self.covs = torch.as_tensor(np.asarray(covs, dtype=np.float64))
        K, d = self.means.shape
        if self.weights.shape != (K,) or self.covs.shape != (K, d, d):
            raise ConfigError(f"gmm: weights must be ({K},) and covs ({K},{d},{d}); got "
                              f"{tuple(self.weights.shape)} and {tuple(self.covs.shape)}")
        if (self.weights < 0).any() or abs(float(self.weights.sum()) - 1) > 1e-6:
            raise ConfigError("gmm: weights must be non-negative and sum to 1")
        if not torch.allclose(self.covs, self.covs.transpose(1, 2)):
            raise ConfigError("gmm: covariances must be symmetric")
        self.evals, self.evecs = torch.linalg.eigh(self.covs)          # (K,d), (K,d,d)
        if (self.evals <= 0).any():
            raise ConfigError("gmm: covariances must be positive definite")
        self.K, self.dim = K, d

    @classmethod
    def random(cls, dim: int = 4, n_components: int = 3, seed: int = 0, mean_scale: float = 2.0,
               cov_min: float = 0.05, cov_max: float = 0.5):
        """A reproducible mixture: means ~ N(0, mean_scale^2), random rotations, eigenvalues in [cov_min, cov_max]."""
        if dim < 1 or n_components < 1 or not 0 < cov_min <= cov_max:
            raise ConfigError("gmm: need dim >= 1, n_components >= 1 and 0 < cov_min <= cov_max")
        rs = np.random.default_rng(seed)
        means = rs.normal(0.0, mean_scale, (n_components, dim))
        covs = []
        for _ in range(n_components):
            q, _ = np.linalg.qr(rs.normal(size=(dim, dim)))
            ev = rs.uniform(cov_min, cov_max, dim)
            covs.append(q @ np.diag(ev) @ q.T)
        covs = np.stack(covs)
        covs = 0.5 * (covs + covs.transpose(0, 2, 1))
        weights = rs.dirichlet(np.full(n_components, 5.0))
        return cls(weights, means, covs)

    # --- closed forms at noise level (alpha, sigma) ---------------------------------------
    def _terms(self, x, alpha, sigma):
        """Per-component log N_k(x) + log pi_k and C_k^{-1}(x - alpha mu_k), for q_t."""
        dt = x.dtype
        a = torch.as_tensor(alpha, dtype=dt).reshape(-1, 1, 1)
        s = torch.as_tensor(sigma, dtype=dt).reshape(-1, 1, 1)
        U, ev, mu = self.evecs.to(x), self.evals.to(x), self.means.to(x)
        diff = x[:, None, :] - a * mu[None]                              # (B,K,d)
        z = torch.einsum("bkd,kde->bke", diff, U)                        # U_k^T diff
        v = a**2 * ev[None] + s**2                                       # (B,K,d) eigenvalues of C_k
        logn = -0.5 * ((z**2 / v).sum(-1) + torch.log(v).sum(-1) + self.dim * math.log(2 * math.pi))
        logw = logn + torch.log(self.weights.to(x))[None]
        cinv_diff = torch.einsum("kde,bke->bkd", U, z / v)
        return logw, cinv_diff

    def log_prob_t(self, x, alpha, sigma):
        return torch.logsumexp(self._terms(x, alpha, sigma)[0], dim=1)

    def score_t(self, x, alpha, sigma):
        logw, cinv_diff = self._terms(x, alpha, sigma)
        r = torch.softmax(logw, dim=1)
        return -(r[..., None] * cinv_diff).sum(1)

    def log_prob(self, x):
        return self.log_prob_t(x, 1.0, 0.0)

    def sample(self, n: int, generator: torch.Generator | None = None, alpha=1.0, sigma=0.0):
        """Exact samples of q_t (data when alpha=1, sigma=0)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x0 = self.means[k] + torch.einsum("nde,ne->nd", self.evecs[k], z * self.evals[k].sqrt())
        return alpha * x0 + sigma * torch.randn(n, self.dim, dtype=torch.float64, generator=generator)

    def mean(self):
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self):
        m = self.mean()
        second = (self.weights[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return second - m[:, None] * m[None, :]


class GMMEps(nn.Module):
    """eps*(x, t) = -sigma(t) grad log q_t(x): the exact noise predictor of a GaussianMixture."""

    def __init__(self, gmm: GaussianMixture, schedule):
        super().__init__()
        self.gmm, self.schedule = gmm, schedule

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        alpha, sigma = self.schedule.alpha(t).to(x.dtype), self.schedule.sigma(t).to(x.dtype)
        return -sigma.reshape(-1, 1) * self.gmm.score_t(x, alpha, sigma)
