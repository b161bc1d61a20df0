"""Negative log-likelihood in bits/dim from the probability-flow ODE (Chen et al. 2018, thm. 1;
Song et al. 2021, app. D.2): log p_0(x_0) = log p_T(x_T) + int_{t_start}^{T} div f(x_t, t) dt, with
x_t solving the ODE dx/dt = f(x, t) from the data point x_0 at t_start up to T.

- Starting time t_start (knob, default the schedule's t_min): the network is trained and the sampler
  ends there, so the ODE is only trusted from t_min up; the model density is then that of x_{t_min},
  which differs from q_0 by O(sigma(t_min)^2 / data variance) (on gmm with vp_linear, t_min = 1e-3:
  below 0.002 bits/dim, see tests/test_nll.py).
- Solver: a Runge-Kutta tableau from bench.solvers.rk.TABLEAUS at a fixed NFE on an `edm` grid, the run's own
  solver and grid (`solver: run`), or a torchdiffeq adaptive method with rtol/atol.
- Divergence: exact (one backward pass per dimension) or Hutchinson's estimator z^T (df/dx) z with one
  probe z per point, fixed for the whole solve (Grathwohl et al. 2019, eq. 7), Rademacher or Gaussian.
- Prior at T: the schedule's N(0, sigma(T)^2 I), or for gmm the exact q_T.
- Points (data_points, shared with the elbo metric): gmm, exact data samples from the (seed, POINTS_STREAM)
  generator; models with real data, the first n_points of model.real_data('test'); on L-level data in
  [lo, hi] (images) each point is dequantised with one uniform draw u per dimension inside its level's cell.

What the number is (the row's `nll_what` says it in words, the protocol's `quantity` and `estimator` in keys):
- gmm and other continuous data: -log2 p(x)/D of the model's continuous density (the probability-flow ODE's
  x_{t_start} marginal), an ODE estimate; with Hutchinson's divergence a Monte-Carlo estimate of it
  (unbiased: the log-density is linear in the divergence).
- L-level data: with cells C_k of volume V per dimension, the model's discrete probability of level k is
  P(k) = int_{C_k} p, and by Jensen -log2 P(k) <= E_u[-log2 p(x(k, u))] - log2 V with x(k, u) uniform on C_k.
  The number is a one-draw Monte-Carlo estimate of that upper bound on the discrete NLL (Theis et al. 2016;
  Ho et al. 2019, Flow++), divided by D like every bits/dim.
  Two cell conventions (knob `cells`):
    score_sde  level k of L -> lo + (hi - lo) (k + u) / L: the unit cells of [0, L) mapped onto [lo, hi] as
               score_sde does for 8-bit data ((255 x + u) / 256); V = (hi - lo) / L, so bits/dim add
               log2(L) - log2(hi - lo) (7 for 8-bit data in [-1, 1]; log2(17) - 1 = 3.09 for digits).  The
               level itself, lo + (hi - lo) k / (L - 1), sits off its cell's centre, at the cell's edge for
               k = 0 and k = L - 1.
    centred    level k -> lo + (hi - lo) (k + u - 1/2) / (L - 1): cells of width (hi - lo) / (L - 1) centred on
               the levels (the bins of DDPM's discretised decoder, Ho et al. 2020, eq. 13); bits/dim add
               log2(L - 1) - log2(hi - lo) (3 for digits).
  The offsets differ by log2(L / (L - 1)) (0.006 bits/dim for 256 levels, 0.087 for 17); the density term
  differs more where the network's density peaks at the levels: on digits 2.47 (score_sde) vs 2.11 (centred).
"""
from __future__ import annotations

import math

import torch

from bench.metrics import Metric, MetricContext, register_metric
from bench.metrics.cache import cached, model_fingerprint
from bench.models.dynamics import Dynamics
from bench.metrics.columns import book, quality
from bench.models.errors import ConfigError
from bench.solvers.rk import TABLEAUS
from bench.solvers.rng import PerSampleRNG, sample_seed
from bench.solvers.timesteps import make_timesteps

ADAPTIVE = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
VARIABLES = ("t", "lambda", "sigma_hat")
DIVERGENCES = ("auto", "exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
PRIORS = ("schedule", "exact")
CELLS = ("score_sde", "centred")
POINTS_STREAM = 1 << 41          # generator stream offsets: data points, dequantisation noise, probes
PROBE_STREAM = 1 << 42


def dt_ds(schedule, t, variable):
    """dt/ds for the integration variable s (t, lambda, or sigma_hat = exp(-lambda))."""
    if variable == "t":
        return torch.ones_like(t)
    dl = schedule.d_lambda(t)
    return 1.0 / dl if variable == "lambda" else -1.0 / (schedule.sigma_hat(t) * dl)


def s_of_t(schedule, t, variable):
    return {"t": lambda u: u, "lambda": schedule.lambda_, "sigma_hat": schedule.sigma_hat}[variable](t)


def t_of_s(schedule, s, variable):
    return {"t": lambda u: u, "lambda": schedule.t_of_lambda, "sigma_hat": schedule.t_of_sigma_hat}[variable](s)


def divergence(v, x, probe=None):
    """div_x v: exact (sum of d v_i / d x_i, one backward per dimension) or z^T (dv/dx) z for a probe z."""
    if probe is not None:
        (g,) = torch.autograd.grad((v * probe).sum(), x, create_graph=False)
        return (g * probe).flatten(1).sum(1)
    vf, div = v.flatten(1), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(vf.shape[1]):
        (g,) = torch.autograd.grad(vf[:, i].sum(), x, retain_graph=i < vf.shape[1] - 1)
        div = div + g.flatten(1)[:, i]
    return div


def augmented_rhs(dyn, variable, probe=None):
    """(dx/ds, d delta/ds) with delta = int div f dt, the ODE of Chen et al. 2018 in variable s."""
    sch = dyn.schedule

    def rhs(s, state):
        x, _ = state
        t = t_of_s(sch, torch.as_tensor(s, dtype=torch.float64), variable)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = dyn.ode_rhs(t, x)
            div = divergence(v, x, probe)
        c = dt_ds(sch, t, variable).to(x.dtype)
        return v.detach() * c, div.detach() * c

    return rhs


def rk_integrate(rhs, state, s_grid, tableau):
    """Fixed-grid explicit Runge-Kutta on a tuple state (Butcher tableau from bench.solvers.rk)."""
    A, b, c, _ = TABLEAUS[tableau]
    for n in range(len(s_grid) - 1):
        h = s_grid[n + 1] - s_grid[n]
        k = []
        for i in range(len(b)):
            yi = tuple(y + sum(float(h * A[i][j]) * kj[m] for j, kj in enumerate(k) if A[i][j] != 0.0)
                       for m, y in enumerate(state))
            k.append(rhs(s_grid[n] + c[i] * h, yi))
        state = tuple(y + sum(float(h * bi) * ki[m] for bi, ki in zip(b, k) if bi != 0.0)
                      for m, y in enumerate(state))
    return state


def ode_logp(dyn, x0, t_grid, *, solver="dopri5", rtol=1e-5, atol=1e-5, variable="lambda", probe=None,
             prior="schedule", gmm=None):
    """log p(x0) under the model's probability-flow ODE: integrate from t_grid[0] (data side) to
    t_grid[-1] = T; t_grid holds just the ends for adaptive solvers.  Returns (log p, x_T, nfe)."""
    sch = dyn.schedule
    s_grid = s_of_t(sch, t_grid.to(torch.float64), variable)
    rhs = augmented_rhs(dyn, variable, probe)
    state = (x0, torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device))
    if solver in TABLEAUS:
        x_T, delta = rk_integrate(rhs, state, s_grid, solver)
    else:
        from torchdiffeq import odeint     # deferred: only an NLL computation needs torchdiffeq (issue 17 item 4)
        sol = odeint(rhs, state, s_grid[[0, -1]].to(x0.device), rtol=rtol, atol=atol, method=solver)
        x_T, delta = sol[0][-1], sol[1][-1]
    T = float(t_grid[-1])
    if prior == "exact":
        logp_T = gmm.log_prob_t(x_T.flatten(1).double(), sch.alpha(T), sch.sigma(T))
    else:
        logp_T = sch.prior_logp(x_T.double())
    return logp_T + delta.double(), x_T, dyn.nfe


def draw_probe(x, seed, indices, kind):
    z = PerSampleRNG(seed, [PROBE_STREAM + i for i in indices], device=x.device, dtype=x.dtype).randn_like(x)
    return torch.sign(z) if kind == "rademacher" else z


def dequantized(model) -> bool:
    """Whether the model's data are L-level values in [lo, hi] (images), so its NLL is a dequantised bound."""
    return model.n_levels is not None and model.data_range is not None


def bits_offset(model, cells: str = "score_sde") -> float:
    """Per-dimension term -log2(cell width) turning a model-space density into bits of the discrete data."""
    if not dequantized(model):
        return 0.0
    lo, hi = model.data_range
    L = model.n_levels
    return math.log2(L if cells == "score_sde" else L - 1) - math.log2(hi - lo)


def levels(x, model):
    """The level index k in 0..L-1 of each value of L-level data in model space [lo, hi]."""
    lo, hi = model.data_range
    L = model.n_levels
    return torch.round((x.double() - lo) / (hi - lo) * (L - 1)).clamp(0, L - 1)


def dequantize(x, model, seed, indices, cells: str = "score_sde"):
    """Uniform dequantisation with u ~ U[0, 1) per dimension from point i's own generator: level k of L ->
    lo + (hi - lo) (k + u) / L (score_sde) or lo + (hi - lo) (k + u - 1/2) / (L - 1) (centred on the level)."""
    lo, hi = model.data_range
    L = model.n_levels
    k = levels(x, model)
    u = torch.stack([torch.rand(x.shape[1:], dtype=torch.float64, generator=g) for g in
                     PerSampleRNG(seed, [POINTS_STREAM + i for i in indices]).gens])
    if cells == "score_sde":
        return lo + (hi - lo) * (k + u.to(x.device)) / L
    return lo + (hi - lo) * (k + u.to(x.device) - 0.5) / (L - 1)


def data_points(model, n: int, seed: int, metric: str = "nll"):
    """The evaluation points of the likelihood metrics (nll, elbo) and their kind: gmm (a model with an exact
    `data.sample`), n exact data samples from the (seed, POINTS_STREAM) generator; otherwise the first n
    points of model.real_data('test'), as stored (L-level data are not dequantised here)."""
    if model.data is not None and hasattr(model.data, "sample"):
        g = torch.Generator().manual_seed(sample_seed(seed, POINTS_STREAM))
        return model.data.sample(n, generator=g), "exact_data_samples"
    if model.real_data is None:
        raise ConfigError(f"{metric}: model '{model.name}' has no data to evaluate the likelihood on (a custom or "
                          f"hf_ddpm model names its data with model.real_data.path)")
    return model.real_data("test")[:n], "real_test"


def points_kind(model) -> str:
    if model.data is not None and hasattr(model.data, "sample"):
        return "exact_data_samples"
    return "real_test"


def discrete_points(model, metric: str) -> bool:
    """Whether a likelihood metric's points are L-level data (a bound on the discrete NLL), after checking, before
    any work, that the model has points at all."""
    kind = points_kind(model)
    if kind == "real_test" and model.real_data is None:
        raise ConfigError(f"{metric}: model '{model.name}' has no data to evaluate the likelihood on (a custom or "
                          f"hf_ddpm model names its data with model.real_data.path)")
    return kind == "real_test" and dequantized(model)


NLL_WHAT = ("-log2 p(x)/D from the probability-flow ODE: on continuous data (gmm, toy2d) the model's continuous "
            "density, an ODE value (exact divergence) or its Monte-Carlo estimate (Hutchinson probe); on L-level "
            "data a Monte-Carlo estimate (one uniform dequantisation draw per point) of an upper bound on the "
            "discrete NLL. The row's nll_what and the protocol's quantity/estimator say which")


def describe_nll(p: dict, levels_: int | None) -> str:
    """One sentence saying what an nll row's number is, from its protocol."""
    solve = (f"{p['solver']} rtol={p['rtol']:g} atol={p['atol']:g}" if p["rtol"] is not None
             else f"{p['solver']} at {p['nfe']} NFE")
    draws = []
    if p["cells"] is not None:
        draws.append(f"1 uniform dequantisation draw per point in {p['cells']} cells")
    if p["divergence"] == "hutchinson":
        draws.append(f"1 {p['probe']} Hutchinson probe per point")
    est = (f"Monte-Carlo estimate ({', '.join(draws)}; ODE {solve}, {p['divergence']} divergence)" if draws
           else f"ODE value ({solve}, exact divergence)")
    what = (f"an upper bound on the discrete NLL of the {levels_}-level data" if p["cells"] is not None
            else "the NLL of the model's continuous density")
    return f"{est} of {what}, from t_start={p['t_start']:g}, {p['points']}"


@register_metric("nll")
class NLL(Metric):
    # checked by bench.guidance before any work: a conditional model's likelihood would need each point's label
    unconditional_only = ("it scores real data points, which carry no requested label, and a guided "
                          "sampler has no likelihood; run it on an unconditional model")
    columns = (
        quality("nll_bpd", "NLL (bits/dim)", "bits/dim", "nll_bpd_se", "absolute", "nll", nfe_dependent="solver",
                se_how="over the points", what=NLL_WHAT),
        book("nll_bpd_se", "standard error of nll_bpd over the points", "bits/dim"),
        book("nll_nfe", "NFE of the likelihood solve", "NFE"),
        book("nll_bpd_exact", "analytic -log2 p(x)/D on the same points (gmm)", "bits/dim"),
        book("nll_what", "what nll_bpd is: a value, an estimate or a bound, and of what"),
    )

    def __init__(self, solver: str = "dopri5", nfe: int = 50, rtol: float = 1e-5, atol: float = 1e-5,
                 variable: str = "lambda", divergence: str = "auto", exact_max_dim: int = 16,
                 probe: str = "rademacher", prior: str = "schedule", n_points: int = 128,
                 t_start: float | None = None, timesteps: str = "edm", batch_size: int = 256,
                 cells: str = "score_sde"):
        valid_solvers = ["run", *TABLEAUS, *ADAPTIVE]
        for name, val, allowed in (("solver", solver, valid_solvers), ("variable", variable, VARIABLES),
                                   ("divergence", divergence, DIVERGENCES), ("probe", probe, PROBES),
                                   ("prior", prior, PRIORS), ("cells", cells, CELLS)):
            if val not in allowed:
                raise ConfigError(f"nll: unknown {name} '{val}'. Valid values are: {', '.join(allowed)}.")
        if not isinstance(n_points, int) or n_points < 2:
            raise ConfigError(f"nll: n_points must be an integer >= 2, got {n_points!r}")
        for k, v in (("rtol", rtol), ("atol", atol)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ConfigError(f"nll: {k} must be a number in (0, 1), got {v!r}")
        super().__init__(solver=solver, nfe=nfe, rtol=rtol, atol=atol, variable=variable, divergence=divergence,
                         exact_max_dim=exact_max_dim, probe=probe, prior=prior, n_points=n_points,
                         t_start=t_start, timesteps=timesteps, batch_size=batch_size, cells=cells)

    # --- resolved settings --------------------------------------------------------------------
    def _divergence(self, model):
        d = self.knobs["divergence"]
        if d == "auto":
            d = "exact" if int(torch.Size(model.shape).numel()) <= self.knobs["exact_max_dim"] else "hutchinson"
        return d

    def _solver_grid(self, ctx):
        """(solver name, time grid from t_start to T, variable)."""
        sch, k = ctx.model.schedule, self.knobs
        t_start = float(k["t_start"] if k["t_start"] is not None else sch.t_min)
        solver, variable = k["solver"], k["variable"]
        if solver == "run":
            solver = ctx.spec.name
            if solver not in TABLEAUS:
                raise ConfigError(f"nll: solver 'run' needs the run's solver to be a Runge-Kutta tableau "
                                  f"({', '.join(TABLEAUS)}), got '{solver}'; set metric_cfg.nll.solver")
            variable = ctx.knobs.get("variable", "sigma_hat")
            grid = ctx.t.flip(0).clone()
        elif solver in TABLEAUS:
            stages = len(TABLEAUS[solver][1])
            if k["nfe"] < stages:
                raise ConfigError(f"nll: solver '{solver}' needs nfe >= {stages}, got {k['nfe']}")
            grid = make_timesteps(k["timesteps"], sch, k["nfe"] // stages + 1).flip(0)
        else:
            grid = torch.tensor([t_start, sch.T], dtype=torch.float64)
        grid[0] = t_start
        return solver, grid, variable

    def _points(self, ctx):
        m, seed = ctx.model, ctx.cfg.get("seed", 0)
        x, kind = data_points(m, self.knobs["n_points"], seed)
        if kind == "real_test" and dequantized(m):
            return dequantize(x, m, seed, range(x.shape[0]), self.knobs["cells"]), "real_test_uniform_dequantized"
        return x.double(), kind

    def _points_kind(self, m):
        kind = points_kind(m)
        return "real_test_uniform_dequantized" if kind == "real_test" and dequantized(m) else kind

    def protocol(self, ctx):
        solver, grid, variable = self._solver_grid(ctx)
        adaptive = solver not in TABLEAUS
        m = ctx.model
        div, deq = self._divergence(m), self._points_kind(m) == "real_test_uniform_dequantized"
        return {"metric": "nll", "units": "bits/dim", "solver": solver, "variable": variable,
                "nfe": None if adaptive else len(TABLEAUS[solver][1]) * (len(grid) - 1),
                "rtol": self.knobs["rtol"] if adaptive else None, "atol": self.knobs["atol"] if adaptive else None,
                "grid": None if adaptive else [float(v) for v in grid],
                "divergence": div, "probe": self.knobs["probe"] if div != "exact" else None,
                "prior": self.knobs["prior"], "t_start": float(grid[0]),
                "points": self._points_kind(m), "n_points": self.knobs["n_points"],
                "quantity": "discrete_nll_upper_bound" if deq else "continuous_density_nll",
                "estimator": "monte_carlo" if deq or div == "hutchinson" else "ode",
                "cells": self.knobs["cells"] if deq else None,
                "bits_offset": bits_offset(m, self.knobs["cells"]), "dataset": m.dataset_id or m.name,
                "seed": ctx.cfg.get("seed", 0)}

    def compute(self, ctx: MetricContext) -> dict:
        """Cached on disk by model (config and weights) and protocol: the value does not depend on the run's
        samples, so a sweep over solvers with the default dopri5 NLL solve pays for it once."""
        key = {"model": ctx.cfg.get("model"), "weights": model_fingerprint(ctx.model), **self.protocol(ctx)}
        return cached(ctx.cfg.get("results_dir", "results"), "nll", key, lambda: self._compute(ctx))

    def _compute(self, ctx: MetricContext) -> dict:
        m, k = ctx.model, self.knobs
        if k["prior"] == "exact" and not hasattr(m.data, "log_prob_t"):
            raise ConfigError(f"nll: prior 'exact' needs a model with an exact q_T (gmm), not '{m.name}'")
        solver, grid, variable = self._solver_grid(ctx)
        x, _ = self._points(ctx)
        dtype = next((p.dtype for p in getattr(m.net, "parameters", lambda: [])()), torch.float64)
        x = x.to(ctx.device, dtype).reshape(-1, *m.shape)
        div, seed = self._divergence(m), ctx.cfg.get("seed", 0)
        logps, nfe = [], 0
        for i in range(0, x.shape[0], k["batch_size"]):
            xb = x[i:i + k["batch_size"]]
            idx = range(i, i + xb.shape[0])
            probe = None if div == "exact" else draw_probe(xb, seed, idx, k["probe"])
            dyn = Dynamics(m.net, m.schedule)
            lp, _, n = ode_logp(dyn, xb, grid, solver=solver, rtol=k["rtol"], atol=k["atol"], variable=variable,
                                probe=probe, prior=k["prior"], gmm=m.data)
            logps.append(lp.cpu())
            nfe = max(nfe, n)
        D = int(torch.Size(m.shape).numel())
        bpd = -torch.cat(logps) / (D * math.log(2)) + bits_offset(m, k["cells"])
        out = {"nll_bpd": float(bpd.mean()), "nll_bpd_se": float(bpd.std() / math.sqrt(len(bpd))), "nll_nfe": nfe,
               "nll_what": describe_nll(self.protocol(ctx), m.n_levels)}
        if m.data is not None and hasattr(m.data, "log_prob"):
            exact = -m.data.log_prob(x.flatten(1).cpu().double()) / (D * math.log(2))
            out["nll_bpd_exact"] = float(exact.mean())      # analytic -log2 p(x)/D on the same points
        return out
