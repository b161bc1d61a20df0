"""Probability-flow ODE and reverse SDE of an epsilon-model under a noise schedule.

All derived predictions (x0, score, EDM denoiser) come from eps in one place here, and every
network call goes through NFECounter, so the benchmark's NFE is counted, never inferred.
"""
from __future__ import annotations

import torch


class NFECounter:
    """Wraps the network; one call on a batch is one network function evaluation."""

    def __init__(self, net):
        self.net, self.nfe = net, 0

    def __call__(self, x, t):
        self.nfe += 1
        return self.net(x, t)

    def reset(self):
        self.nfe = 0


def _bc(c, x):
    """Reshape a scalar or per-sample coefficient to broadcast against x."""
    # a Python number goes straight to x's dtype (as_tensor would round it to float32 first: 1e-8 off in float64)
    c = c.to(x.dtype) if torch.is_tensor(c) else torch.as_tensor(c, dtype=x.dtype, device=x.device)
    return c.reshape(-1, *([1] * (x.dim() - 1))) if c.dim() else c


# What a network may predict (DESIGN 'model output'), with x_t = alpha x0 + sigma eps:
#   eps       the noise eps (Ho et al. 2020)
#   x0        the data x0 (E[x0 | x_t])
#   v         v = alpha eps - sigma x0 (Salimans & Ho 2022, sec. 4)
#   score     grad log q_t(x) = -eps / sigma (Song et al. 2021)
#   velocity  the probability-flow velocity dx/dt = alpha' x0 + sigma' eps (flow matching, Lipman et al. 2022)
PARAMETRIZATIONS = ("eps", "x0", "v", "score", "velocity")


def to_eps(out, x, t, schedule, parametrization: str):
    """eps from a network output in `parametrization`, by the closed forms that x = alpha x0 + sigma eps gives:
      x0:       eps = (x - alpha x0) / sigma
      v:        eps = (alpha v + sigma x) / (alpha^2 + sigma^2)       (= alpha v + sigma x on VP schedules)
      score:    eps = -sigma score
      velocity: eps = (alpha u - alpha' x) / (alpha sigma' - alpha' sigma), the 2x2 solve of x = alpha x0 + sigma eps,
                u = alpha' x0 + sigma' eps; equal to (u - f x) 2 sigma / g^2, but finite where alpha = 0 (flow at t = 1,
                alpha' = -1, sigma' = 1: eps = (1 - t) u + x) and without f's and g^2's 1/alpha.
    Coefficients in float64 from the schedule, then x's dtype; `eps` passes through untouched."""
    if parametrization == "eps":
        return out
    t = torch.as_tensor(t, dtype=torch.float64)
    s = schedule
    if parametrization == "x0":
        return (x - _bc(s.alpha(t), x) * out) / _bc(s.sigma(t), x)
    if parametrization == "v":
        a, sg = s.alpha(t), s.sigma(t)
        return (_bc(a / (a ** 2 + sg ** 2), x) * out + _bc(sg / (a ** 2 + sg ** 2), x) * x)
    if parametrization == "score":
        return -_bc(s.sigma(t), x) * out
    if parametrization == "velocity":
        a, sg, da, ds = s.alpha(t), s.sigma(t), s.d_alpha(t), s.d_sigma(t)
        det = a * ds - da * sg
        return _bc(a / det, x) * out - _bc(da / det, x) * x
    raise ValueError(f"unknown parametrization {parametrization!r}; valid: {', '.join(PARAMETRIZATIONS)}")


class EpsNet(torch.nn.Module):
    """The eps-callable a LoadedModel exposes: calls the raw network as raw(x, t) (raw(x, t, cond) when a condition is
    given) and converts its output to eps with to_eps, once per evaluation; for 'eps' the raw output unchanged.
    .to, .parameters() and .state_dict() are the raw network's (weight fingerprints, device moves unchanged), and any
    other attribute is looked up on the raw network (model.net.net is an EpsAdapter's network, as before)."""

    def __init__(self, raw_net, schedule, parametrization: str = "eps"):
        super().__init__()
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"unknown parametrization {parametrization!r}; valid: {', '.join(PARAMETRIZATIONS)}")
        self.raw_net, self.schedule, self.parametrization = raw_net, schedule, parametrization

    def forward(self, x, t, cond=None):
        out = self.raw_net(x, t) if cond is None else self.raw_net(x, t, cond)
        return to_eps(out, x, t, self.schedule, self.parametrization)

    def state_dict(self, *args, **kwargs):
        sd = getattr(self.raw_net, "state_dict", None)
        return sd(*args, **kwargs) if sd is not None else {}

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            raw = self.__dict__.get("raw_net", self.__dict__.get("_modules", {}).get("raw_net"))
            if raw is None or name.startswith("__"):
                raise
            return getattr(raw, name)


class Dynamics:
    """Right-hand sides for samplers: ode_rhs(t, x) (torchdiffeq signature), sde_drift(t, x), diffusion(t)."""

    def __init__(self, net, schedule):
        self.counter = NFECounter(net)
        self.schedule = schedule

    @property
    def nfe(self) -> int:
        return self.counter.nfe

    def eps(self, x, t):
        if isinstance(t, float):
            # a grid point as a Python float (the solvers' step loops, issue 17): one fill of x's dtype on x's device,
            # the value as_tensor(float64) -> expand -> .to(dtype) gives, without the three small ops
            return self.counter(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.counter(x, t.to(x.device, x.dtype))

    # Derived predictions: x_t = alpha x0 + sigma eps (DESIGN: derived from eps in one place).
    def x0(self, x, t, eps=None):
        eps = self.eps(x, t) if eps is None else eps
        s = self.schedule
        return (x - _bc(s.sigma(t), x) * eps) / _bc(s.alpha(t), x)

    def x0_at(self, x, t: float, alpha: float, sigma: float, eps=None):
        """x0 at a grid point whose alpha(t), sigma(t) the solver took from the schedule once per grid as Python floats
        (issue 17): the same (x - sigma eps)/alpha as x0, in two fused tensor ops, with no schedule call."""
        eps = self.eps(x, t) if eps is None else eps
        return x.sub(eps, alpha=sigma).div_(alpha)

    def score(self, x, t, eps=None):
        eps = self.eps(x, t) if eps is None else eps
        return -eps / _bc(self.schedule.sigma(t), x)

    def denoiser(self, x_hat, sigma_hat):
        """EDM's D(x_hat; sigma_hat) = x_hat - sigma_hat eps(alpha x_hat, t(sigma_hat)) (Karras et al. 2022, eq. 12)."""
        t = self.schedule.t_of_sigma_hat(torch.as_tensor(sigma_hat, dtype=torch.float64))
        return self.x0(_bc(self.schedule.alpha(t), x_hat) * x_hat, t)

    # Probability-flow ODE dx/dt = f x - g^2/2 score = f x + g^2/(2 sigma) eps (Song et al. 2021, eq. 13).
    def ode_rhs(self, t, x, eps=None):
        s = self.schedule
        eps = self.eps(x, t) if eps is None else eps
        return _bc(s.f(t), x) * x + _bc(s.g2(t) / (2 * s.sigma(t)), x) * eps

    # Reverse SDE dx = [f x - g^2 score] dt + g dW-bar (Song et al. 2021, eq. 6).
    def sde_drift(self, t, x, eps=None):
        s = self.schedule
        eps = self.eps(x, t) if eps is None else eps
        return _bc(s.f(t), x) * x + _bc(s.g2(t) / s.sigma(t), x) * eps

    def diffusion(self, t):
        return torch.sqrt(self.schedule.g2(t))

    # EDM form: d x_hat / d sigma_hat = eps(alpha x_hat, t(sigma_hat)) (Karras et al. 2022, eq. 4 with s = alpha).
    def ode_rhs_sigma_hat(self, sigma_hat, x_hat):
        t = self.schedule.t_of_sigma_hat(torch.as_tensor(sigma_hat, dtype=torch.float64))
        return self.eps(_bc(self.schedule.alpha(t), x_hat) * x_hat, t)


class Guided:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6, in diffusers' convention):
    eps = eps(x, t, null_cond) + s (eps(x, t, cond) - eps(x, t, null_cond)), itself an eps-callable (x, t).

    cond and null_cond are tensors batched on dim 0 like x (class labels, or embeddings).  s = 1 is plain
    conditional sampling and s = 0 unconditional, one network forward each; any other s batches cond and
    null_cond into ONE network call on 2x the batch.  Wrapped by Dynamics' NFECounter, one guided evaluation
    counts as one NFE (the field's convention); `forwards` counts network forwards per sample (2 per guided
    evaluation when s is not 0 or 1), recorded as nfe_forwards."""

    def __init__(self, net, cond, guidance_scale: float = 1.0, null_cond=None):
        s = float(guidance_scale)
        if s != 1.0 and null_cond is None:
            raise ValueError(f"guidance_scale={s} needs a null condition")
        self.net, self.cond, self.null_cond, self.scale = net, cond, null_cond, s
        self.forwards = 0

    @property
    def forwards_per_eval(self) -> int:
        return 1 if self.scale in (0.0, 1.0) else 2

    def to(self, *args, **kwargs):
        if hasattr(self.net, "to"):
            self.net = self.net.to(*args, **kwargs)
        return self

    def __call__(self, x, t):
        n = x.shape[0]
        if self.cond.shape[0] != n:
            raise ValueError(f"Guided: a batch of {n} samples but {self.cond.shape[0]} conditions")
        self.forwards += self.forwards_per_eval
        if self.scale == 1.0:
            return self.net(x, t, self.cond.to(x.device))
        if self.scale == 0.0:
            return self.net(x, t, self.null_cond.to(x.device))
        both = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.cond, self.null_cond]).to(x.device))
        eps_c, eps_u = both[:n], both[n:]
        return eps_u + self.scale * (eps_c - eps_u)


class ClassifierGuided:
    """Classifier guidance (Song et al. 2021, sec. 5 and app. I; Dhariwal & Nichol 2021, eq. 14 with scale s):
    score(x | y) = score(x) + s grad_x log p_t(y | x), i.e. eps = eps(x, t) - s sigma(t) grad_x log p_t(y | x),
    itself an eps-callable (x, t).  `log_potential` is any differentiable lp(x, t, y) -> (B,)
    (bench.models.classifier: a noise-aware classifier's log p_t(y | x), the exact GMM posterior, or a user's
    energy -E(x)).  Each call evaluates the network once (the NFE Dynamics counts) and, unless s = 0, the
    log-potential and its input gradient once (`classifier_evals`, its own column); `forwards` is the wrapped
    network's forward count (classifier-free guidance's 2 per NFE when the net is itself Guided)."""

    def __init__(self, net, log_potential, labels, scale: float, schedule):
        self.net, self.lp, self.labels, self.scale, self.schedule = net, log_potential, labels, float(scale), schedule
        self.classifier_evals, self._calls = 0, 0

    @property
    def forwards(self) -> int:
        return self.net.forwards if hasattr(self.net, "forwards") else self._calls

    def to(self, *args, **kwargs):
        if hasattr(self.net, "to"):
            self.net = self.net.to(*args, **kwargs)
        return self

    def grad_log_potential(self, x, t):
        """grad_x lp(x, t, y), summed over the batch (rows are independent), outside inference mode."""
        y = self.labels
        if y is not None and y.shape[0] != x.shape[0]:
            raise ValueError(f"ClassifierGuided: a batch of {x.shape[0]} samples but {y.shape[0]} labels")
        with torch.inference_mode(False), torch.enable_grad():   # clones: inference tensors cannot enter autograd
            y = None if y is None else y.to(x.device).clone()
            xg = x.detach().clone().requires_grad_(True)
            lp = self.lp(xg, t.detach().clone(), y)
            (g,) = torch.autograd.grad(lp.sum(), xg)
        return g

    def __call__(self, x, t):
        self._calls += 1
        eps = self.net(x, t)
        if self.scale == 0.0:
            return eps
        self.classifier_evals += 1
        g = self.grad_log_potential(x, t)
        sigma = self.schedule.sigma(torch.as_tensor(t, dtype=torch.float64))
        return eps - self.scale * _bc(sigma, x) * g.to(x.dtype)
