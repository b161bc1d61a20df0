"""Log-potentials for classifier guidance: log p_t(y | x) of a noise-aware classifier, or any differentiable
log-potential (energy guidance: log-potential = -E(x)).

A log-potential is a callable lp(x, t, y) -> (B,) tensor, differentiable in x, with
- x: a batch of noisy samples x_t (any dtype; the result is in x's dtype),
- t: per-sample schedule times (B,), in x's dtype,
- y: per-sample class labels (B,) int64, or None for a label-free potential,
and attributes `n_classes` (None: label-free) and `name` (what the row records).  The dynamics adds
s grad_x lp(x, t, y) to the score (models/dynamics.py ClassifierGuided).
"""
from __future__ import annotations

import torch

from bench.models.errors import ConfigError


class ExactPosterior:
    """log p_t(y | x) of the Gaussian mixture with class = component, in closed form:
    log pi_y N(x; alpha mu_y, alpha^2 S_y + sigma^2 I) - log q_t(x) (Bayes' rule on the marginals of x_t)."""

    name = "exact_posterior"

    def __init__(self, gmm, schedule):
        self.gmm, self.schedule, self.n_classes = gmm, schedule, gmm.K

    def __call__(self, x, t, y):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        alpha, sigma = self.schedule.alpha(t).to(x.dtype), self.schedule.sigma(t).to(x.dtype)
        logw, _ = self.gmm._terms(x, alpha, sigma)
        return torch.log_softmax(logw, dim=1).gather(1, y.reshape(-1, 1).to(x.device)).squeeze(1)


class ClassifierLogits:
    """log p_t(y | x) = log_softmax(net(x, t))[y] of a classifier network that returns logits (B, n_classes); runs in
    x's dtype and device (a copy of the weights per dtype/device, made once)."""

    def __init__(self, net, n_classes: int, name: str):
        self.net, self.n_classes, self.name = net, int(n_classes), name
        self._copies: dict = {}

    def __call__(self, x, t, y):
        from bench.models.netio import net_for

        logits = net_for(self.net, x, self._copies)(x, t.to(x.dtype))
        return torch.log_softmax(logits, dim=1).gather(1, y.reshape(-1, 1).to(x.device)).squeeze(1)


class UserPotential:
    """A user's callable by import path: obj(x, t, y) returning (B,) (a log-potential, used as it is) or
    (B, K) (logits: log_softmax gathered at y).  obj.n_classes, if present, is the number of classes; without it
    the potential is label-free and is called with y = None."""

    def __init__(self, obj, path: str):
        self.obj, self.name = obj, path
        k = getattr(obj, "n_classes", None)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"classifier={path}: n_classes must be a positive int or absent, got {k!r}")
        self.n_classes = k

    def __call__(self, x, t, y):
        out = self.obj(x, t, y)
        if not torch.is_tensor(out):
            raise ConfigError(f"classifier={self.name} returned {type(out).__name__}; it must return a tensor of "
                              f"shape (batch,) (a log-potential) or (batch, n_classes) (logits).")
        n = x.shape[0]
        if out.shape == (n,):
            return out
        if out.dim() == 2 and out.shape[0] == n:
            if y is None:
                raise ConfigError(f"classifier={self.name} returns logits {tuple(out.shape)} but has no n_classes "
                                  f"attribute, so the run has no labels; set obj.n_classes = {out.shape[1]}.")
            return torch.log_softmax(out, dim=1).gather(1, y.reshape(-1, 1).to(out.device)).squeeze(1)
        raise ConfigError(f"classifier={self.name} returned shape {tuple(out.shape)} for a batch of {n}; expected "
                          f"({n},) (a log-potential) or ({n}, n_classes) (logits).")


def probe(lp, model) -> None:
    """Call a user's log-potential once on a batch of 2 zeros at mid time (no gradient): a wrong output shape or a
    failing call is a ConfigError before any sampling."""
    x = torch.zeros(2, *model.shape)
    t = torch.full((2,), 0.5 * float(model.schedule.T))
    y = None if lp.n_classes is None else torch.zeros(2, dtype=torch.long)
    try:
        with torch.no_grad():
            lp(x, t, y)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"classifier={lp.name} fails on a batch of shape {tuple(x.shape)} with t of shape (2,) "
                          f"and labels {None if y is None else '(2,) int64'}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None


def from_import_path(path: str) -> UserPotential:
    """classifier=package.module:obj; obj a callable (x, t, y), or a class instantiated with no arguments."""
    from bench.models.imports import import_object

    obj = import_object(path, "classifier", "my_pkg.guidance:log_potential")
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as e:
            raise ConfigError(f"classifier={path}: the class could not be instantiated with no arguments "
                              f"({type(e).__name__}: {e}).") from None
    if not callable(obj):
        raise ConfigError(f"classifier={path} is a {type(obj).__name__}, not a callable (x, t, y).")
    return UserPotential(obj, path)
