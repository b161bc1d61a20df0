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

    def score_t(self, x, alpha, sigma, labels=None):
        """grad log q_t(x); with labels (B,), row b's score of q_t(x | y = labels[b]): component k = class k,
        so the posterior responsibilities become one-hot (label K = the null label: the whole mixture)."""
        logw, cinv_diff = self._terms(x, alpha, sigma)
        r = torch.softmax(logw, dim=1)
        if labels is not None:
            labels = torch.as_tensor(labels, device=x.device).long().reshape(-1)
            onehot = torch.nn.functional.one_hot(labels.clamp(max=self.K - 1), self.K).to(r)
            r = torch.where((labels < self.K)[:, None], onehot, r)
        return -(r[..., None] * cinv_diff).sum(1)

    def posterior(self, x):
        """p(y = k | x) of clean data x: the class posterior of the class-conditional mixture (class = component)."""
        return torch.softmax(self._terms(x, 1.0, 0.0)[0], dim=1)

    def sample_class(self, labels, generator: torch.Generator | None = None):
        """Exact samples of x_0 | y = labels[i] (component labels[i])."""
        k = torch.as_tensor(labels).long()
        z = torch.randn(len(k), self.dim, dtype=torch.float64, generator=generator)
        return self.means[k] + torch.einsum("nde,ne->nd", self.evecs[k], z * self.evals[k].sqrt())

    def x0_t(self, x, alpha, sigma, labels=None):
        """Tweedie's E[x0 | x_t = x] from the mixture posterior directly (not through eps): sum_k r_k(x) m_k(x),
        m_k = mu_k + alpha S_k C_k^{-1}(x - alpha mu_k) the component's posterior mean (Bishop 2006, eq. 2.116);
        labels as in score_t.  Finite at alpha = 0 (the data mean) and sigma = 0 (x itself)."""
        logw, cinv_diff = self._terms(x, alpha, sigma)
        r = torch.softmax(logw, dim=1)
        if labels is not None:        # the class-conditional mixture: component = class (score_t's rule)
            labels = torch.as_tensor(labels, device=x.device).long().reshape(-1)
            onehot = torch.nn.functional.one_hot(labels.clamp(max=self.K - 1), self.K).to(r)
            r = torch.where((labels < self.K)[:, None], onehot, r)
        a = torch.as_tensor(alpha, dtype=x.dtype).reshape(-1, 1, 1)
        m = self.means.to(x)[None] + a * torch.einsum("kde,bke->bkd", self.covs.to(x), cinv_diff)
        return (r[..., None] * m).sum(1)

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
    """eps*(x, t) = -sigma(t) grad log q_t(x): the exact noise predictor of a GaussianMixture.

    conditional=True: the class-conditional mixture, class k = component k, null label K; forward(x, t, cond)
    gives eps*(x, t | y = cond) = -sigma grad log q_t(x | y) (cond=None or K: the unconditional eps*)."""

    parametrization = "eps"   # what forward returns (gmm's `parametrization` knob): exact_prediction's closed forms

    def __init__(self, gmm: GaussianMixture, schedule, conditional: bool = False):
        super().__init__()
        self.gmm, self.schedule, self.conditional = gmm, schedule, conditional

    def forward(self, x, t, cond=None):
        if cond is not None and not self.conditional:
            raise ValueError("this gmm is unconditional (conditional: false) but was given a condition")
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        alpha, sigma = self.schedule.alpha(t).to(x.dtype), self.schedule.sigma(t).to(x.dtype)
        if self.parametrization != "eps":
            return exact_prediction(self.gmm, self.schedule, x, t, self.parametrization, cond)
        return -sigma.reshape(-1, 1) * self.gmm.score_t(x, alpha, sigma, cond)


def exact_prediction(gmm: GaussianMixture, schedule, x, t, parametrization: str, labels=None):
    """The exact prediction in each parametrization (models/dynamics.py PARAMETRIZATIONS), each in closed form from
    the mixture (not through dynamics.to_eps, so tests/test_parametrization.py compares independent paths):
    score = grad log q_t; x0 = Tweedie's posterior mean; v = alpha eps - sigma x0 (Salimans & Ho 2022) and
    velocity = alpha' x0 + sigma' eps (flow matching's dx/dt) from eps = -sigma score and that x0."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    c = lambda v: v.to(x.dtype).reshape(-1, 1)  # noqa: E731
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    a, s = alpha.to(x.dtype), sigma.to(x.dtype)
    if parametrization == "score":
        return gmm.score_t(x, a, s, labels)
    if parametrization == "x0":
        return gmm.x0_t(x, a, s, labels)
    eps, x0 = -c(sigma) * gmm.score_t(x, a, s, labels), gmm.x0_t(x, a, s, labels)
    if parametrization == "v":
        return c(alpha) * eps - c(sigma) * x0
    if parametrization == "velocity":
        return c(schedule.d_alpha(t)) * x0 + c(schedule.d_sigma(t)) * eps
    raise ConfigError(f"gmm: unknown parametrization {parametrization!r}")
