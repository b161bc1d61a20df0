"""Truncation error of a solver against references of the same model from the same x_T.

- Global error (deterministic solvers): RMS per dimension of the samples against a float64 reference
  solve of the probability-flow ODE (torchdiffeq dopri5 at tight tolerance in log sigma_hat), which ends
  with the same final step as the solvers (x0-prediction at the last positive sigma), so the number
  measures the solver's discretisation of [t_min, T].  Only the first `n_samples` samples are used; the
  reference is cached on disk keyed by model config, seed, sample indices, t range and tolerances.
- The reference's own error is measured, not assumed: the first `check_samples` samples are solved again at
  tolerances 10 times tighter, and the RMS difference (trunc_ref_err) estimates the reference's RMS error (dopri5's
  error falls 8-19x per decade of tolerance on digits, so within about 15 %).  Where it exceeds `ref_fraction`
  (0.1) of trunc_rms, the tolerances are tightened tenfold, down to `min_rtol`; a value still above is flagged
  trunc_ref_limited.  Since |trunc_rms - true error| <= the reference's RMS error, the reported value is within
  ref_fraction of the truth.  The row records the tolerance used (trunc_ref_rtol).
- Local-error profile: for each step n of the run's grid, one step of the run's solver from the reference
  state at t_n to t_{n+1} (the solver called on the two-point grid, so it ends with its x0-prediction at
  t_{n+1}), against the reference's x0-prediction there; RMS per step.  Multistep solvers take their
  single-step start-up scheme here.
- Stochastic solvers drawing their noise through rng.increment (spec.brownian): strong error, RMS against
  the same solver on a grid `refine` times finer driven by the same Brownian path (BrownianRNG);
  other stochastic solvers get 'n/a'.
- fit_order: the empirical order across the NFE values of a sweep.
"""
from __future__ import annotations

import math

import torch

from bench import guidance
from bench.metrics import Metric, MetricContext, register_metric
from bench.metrics.cache import cached, model_fingerprint, tensor_hash
from bench.models.dynamics import Dynamics
from bench.metrics.columns import book, quality
from bench.models.errors import ConfigError
from bench.solvers.adaptive import trajectory_log_sigma_hat
from bench.solvers.brownian import BrownianRNG, refine_grid
from bench.solvers.rng import PerSampleRNG


def reference_trajectory(net, schedule, x_T, t_grid, rtol=1e-8, atol=1e-8, method="dopri5"):
    """float64 states x(t_k) of the probability-flow ODE from x_T at t_grid[0], at every time of t_grid.

    Integrated in u = log sigma_hat, d x_hat/du = sigma_hat eps: smooth over the whole range, and an
    adaptive step that overshoots the end (torchdiffeq steps past t1 and interpolates) stays at sigma_hat > 0.
    Returns (states (len(t_grid), *x_T.shape), nfe used)."""
    dyn = Dynamics(net, schedule)
    traj = trajectory_log_sigma_hat(dyn, x_T.to(torch.float64), t_grid, rtol, atol, method)
    return traj, dyn.nfe


def reference_solve(net, schedule, x_T, t_start, t_end, rtol=1e-8, atol=1e-8, method="dopri5"):
    """float64 solution x_0: the reference trajectory to t_end, then the x0-prediction there.  Returns (x_0, nfe)."""
    traj, nfe = reference_trajectory(net, schedule, x_T, [float(t_start), float(t_end)], rtol, atol, method)
    dyn = Dynamics(net, schedule)
    return dyn.x0(traj[-1], float(t_end)), nfe + dyn.nfe


def rms(a, b):
    return float(torch.sqrt(((a.double() - b.double()) ** 2).mean()))


def per_sample_mse(a, b):
    """e_i, the mean squared error per dimension of sample i (float64), from which rms_se and rms_tail derive."""
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1)


def rms_se(a, b) -> tuple[float, float]:
    """RMS per dimension over samples and its standard error over samples: with e_i the mean squared error of
    sample i, rms = sqrt(mean e) and, by the delta method, se = sd(e) / sqrt(n) / (2 rms)."""
    e = per_sample_mse(a, b)
    r = float(torch.sqrt(e.mean()))
    if e.numel() < 2 or r == 0.0:
        return r, float("nan") if e.numel() < 2 else 0.0
    return r, float(e.std() / math.sqrt(e.numel()) / (2 * r))


def rms_tail(a, b) -> dict:
    """The spread of the per-sample errors behind rms: with r_i = sqrt(e_i) sample i's RMS error per dimension, their
    median, the largest and its index among the compared samples (the first n of the run: the sample index).  On a
    trained network a few trajectories near a boundary between modes carry most of rms (README, the digits figure);
    trunc_worst / trunc_median says how much."""
    r = per_sample_mse(a, b).sqrt()
    i = int(r.argmax())
    return {"trunc_median": float(r.median()), "trunc_worst": float(r[i]), "trunc_worst_index": i}


def fit_order(nfes, errors) -> tuple[float, float]:
    """Least-squares fit of log error = c - p log NFE over a sweep; returns (p, c).  Rows with a
    non-positive or missing error are dropped; at least two distinct NFE values are needed."""
    pts = [(math.log(n), math.log(e)) for n, e in zip(nfes, errors)
           if n and e is not None and isinstance(e, (int, float)) and e > 0 and math.isfinite(e)]
    if len({x for x, _ in pts}) < 2:
        raise ValueError("fit_order needs errors at two or more distinct NFE values")
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return -slope, my - slope * mx


def local_error_profile(model, spec, knobs, t, x_T, traj, dtype):
    """RMS one-step error of each step of grid t started from the reference states traj (at t), in x0 space."""
    out = []
    for n in range(len(t) - 1):
        dyn = Dynamics(model.net, model.schedule)
        rng = PerSampleRNG(0, range(x_T.shape[0]), device=x_T.device, dtype=dtype)
        with torch.inference_mode():
            x0_step = spec.fn(dyn, traj[n].to(dtype), t[n:n + 2], rng, **knobs)
            x0_ref = Dynamics(model.net, model.schedule).x0(traj[n + 1], t[n + 1])
        out.append(rms(x0_step, x0_ref))
    return out


def strong_error(fn, model, x_T, t, seed, indices, refine, knobs=None, dtype=torch.float64):
    """RMS of the solver on grid t against the same solver on the refined grid, both driven by one
    Brownian path per sample (BrownianRNG).  Returns (error, fine-grid NFE)."""
    knobs = knobs or {}
    fine = refine_grid(t, refine)
    res = []
    for grid in (torch.as_tensor(t, dtype=torch.float64), fine):
        rng = BrownianRNG(seed, indices, fine, device=x_T.device, dtype=dtype)
        dyn = Dynamics(model.net, model.schedule)
        with torch.inference_mode():
            res.append(fn(dyn, x_T.to(dtype), grid, rng, **knobs))
    err, se = rms_se(res[0], res[1])
    return err, dyn.nfe, se


@register_metric("trunc")
class TruncationError(Metric):
    columns = (
        quality("trunc_rms", "truncation error (RMS per dim)", "", "trunc_rms_se", "ratio", "err", log=True,
                order=True, se_how="over samples, delta method"),
        book("trunc_rms_se", "standard error of trunc_rms over samples (delta method)"),
        quality("trunc_strong_rms", "strong error of stochastic solvers (RMS, same Brownian path)", "",
                "trunc_strong_rms_se", "ratio", "err", log=True, order=True, se_how="over samples, delta method"),
        book("trunc_strong_rms_se", "standard error of trunc_strong_rms over samples"),
        book("trunc_median", "median over the compared samples of each sample's RMS error per dim"),
        book("trunc_worst", "largest per-sample RMS error per dim (trunc_worst / trunc_median: how heavy the tail is)"),
        book("trunc_worst_index", "index of the sample with trunc_worst"),
        book("trunc_ref_nfe", "NFE of the reference solve", "NFE"),
        book("trunc_ref_rtol", "rtol of the reference solve (atol scaled alike), after tightening"),
        book("trunc_ref_err", "estimated RMS error of the reference: against a 10x tighter solve of the first "
                              "check_samples samples"),
        book("trunc_ref_limited", "true when trunc_ref_err > ref_fraction * trunc_rms at min_rtol: the value is "
                                  "limited by its reference"),
        book("trunc_local_profile", "one-step local error per step"),
        book("trunc_note", "why trunc is not available"),
    )
    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5", n_samples: int = 256,
                 profile: bool = True, profile_samples: int = 32, refine: int = 8, check_samples: int = 16,
                 ref_fraction: float = 0.1, min_rtol: float = 1e-10):
        for k, v, lo in (("n_samples", n_samples, 1), ("profile_samples", profile_samples, 1), ("refine", refine, 2),
                         ("check_samples", check_samples, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"trunc: {k} must be an integer >= {lo}, got {v!r}")
        for k, v in (("rtol", rtol), ("atol", atol), ("min_rtol", min_rtol), ("ref_fraction", ref_fraction)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ConfigError(f"trunc: {k} must be a number in (0, 1), got {v!r}")
        if min_rtol > rtol:
            raise ConfigError(f"trunc: min_rtol ({min_rtol}) must be <= rtol ({rtol}), the tolerance tightening starts from")
        super().__init__(rtol=rtol, atol=atol, method=method, n_samples=n_samples, profile=profile,
                         profile_samples=profile_samples, refine=refine, check_samples=check_samples,
                         ref_fraction=ref_fraction, min_rtol=min_rtol)

    def _n(self, ctx, key="n_samples"):
        return min(self.knobs[key], int(ctx.samples.shape[0]))

    def protocol(self, ctx):
        k = self.knobs
        if ctx.spec.stochastic:
            return {"metric": "trunc", "statistic": "strong_rms_per_dim", "reference": "same_solver_fine_grid",
                    "refine": k["refine"], "noise": "brownian_path_per_sample", "n_samples": self._n(ctx),
                    "applicable": bool(ctx.spec.brownian)}
        return {"metric": "trunc", "reference": k["method"], "reference_dtype": "float64",
                "rtol": k["rtol"], "atol": k["atol"], "ref_fraction": k["ref_fraction"], "min_rtol": k["min_rtol"],
                "check_samples": min(k["check_samples"], self._n(ctx)), "variable": "log_sigma_hat",
                "final_step": "denoise", "statistic": "rms_per_dim", "n_samples": self._n(ctx),
                "sample_indices": f"0..{self._n(ctx) - 1}",
                "profile": "one_step_x0_rms" if k["profile"] else None,
                "profile_samples": self._n(ctx, "profile_samples") if k["profile"] else None}

    def _ref_key(self, ctx, n, t_part, rtol, atol):
        k = self.knobs
        return {"model": ctx.cfg.get("model"), "weights": model_fingerprint(ctx.model), "seed": ctx.cfg.get("seed"),
                "indices": [0, n],
                "t": [float(v) for v in t_part], "rtol": rtol, "atol": atol, "method": k["method"],
                "x_T": tensor_hash(ctx.x_T[:n]),
                **({"guidance": c.key()} if (c := guidance.of_context(ctx)) is not None else {})}

    def _reference(self, ctx, n, rtol, atol):
        """float64 reference x_0 of the first n samples at tolerances (rtol, atol), cached on disk."""
        m, k = ctx.model, self.knobs

        def solve():
            refs, nfe = [], 0
            for i in range(0, n, ctx.batch_size):
                net = guidance.model_of(ctx, range(i, min(i + ctx.batch_size, n))).net   # the samples' labels
                with torch.inference_mode():
                    r, used = reference_solve(net, m.schedule, ctx.x_T[i:min(i + ctx.batch_size, n)],
                                              ctx.t[0], ctx.t[-1], rtol, atol, k["method"])
                refs.append(r.cpu())
                nfe = max(nfe, used)
            return {"x0": torch.cat(refs), "nfe": nfe}

        key = self._ref_key(ctx, n, [ctx.t[0], ctx.t[-1]], rtol, atol)
        return cached(ctx.cfg.get("results_dir", "results"), "trunc_ref", key, solve)

    def _tolerances(self):
        """(rtol, atol) from the configured ones tightened tenfold at a time down to min_rtol."""
        k = self.knobs
        rtol, atol = float(k["rtol"]), float(k["atol"])
        while True:
            yield rtol, atol
            if rtol / 10 < k["min_rtol"] * (1 - 1e-9):
                return
            rtol, atol = rtol / 10, atol / 10

    def compute(self, ctx: MetricContext) -> dict:
        if ctx.spec.stochastic:
            return self._stochastic(ctx)
        n, k = self._n(ctx), self.knobs
        m_chk = min(k["check_samples"], n)
        x = ctx.samples[:n]
        for rtol, atol in self._tolerances():
            ref = self._reference(ctx, n, rtol, atol)
            err, se = rms_se(x, ref["x0"].to(x.device))
            tight = self._reference(ctx, m_chk, rtol / 10, atol / 10)
            ref_err = rms(ref["x0"][:m_chk], tight["x0"])
            if ref_err <= k["ref_fraction"] * err:
                break
        limited = bool(ref_err > k["ref_fraction"] * err)
        out = {"trunc_rms": err, "trunc_rms_se": se, **rms_tail(x, ref["x0"].to(x.device)), "trunc_ref_nfe": ref["nfe"],
               "trunc_ref_rtol": rtol, "trunc_ref_err": ref_err, "trunc_ref_limited": limited}
        if limited:
            out["trunc_note"] = (f"limited by the reference: its estimated error {ref_err:.3g} exceeds "
                                 f"{k['ref_fraction']} x trunc_rms at rtol = {rtol:g} (min_rtol); lower "
                                 f"metric_cfg.trunc.min_rtol")
        ctx.cache["trunc_reference"] = ref["x0"]
        if k["profile"]:
            out["trunc_local_profile"] = self._profile(ctx, rtol, atol)
        return out

    def _profile(self, ctx, rtol, atol):
        k, spec = self.knobs, ctx.spec
        if spec.min_steps > 2:
            return f"n/a: solver '{spec.name}' needs at least {spec.min_steps} grid points per call"
        n = self._n(ctx, "profile_samples")
        m = guidance.model_of(ctx, range(n))

        def solve():
            with torch.inference_mode():
                traj, _ = reference_trajectory(m.net, m.schedule, ctx.x_T[:n], ctx.t, rtol, atol, k["method"])
            return traj.cpu()

        traj = cached(ctx.cfg.get("results_dir", "results"), "trunc_traj", self._ref_key(ctx, n, ctx.t, rtol, atol), solve)
        return local_error_profile(m, spec, ctx.knobs, ctx.t, ctx.x_T[:n], traj.to(ctx.x_T.device), ctx.dtype)

    def _stochastic(self, ctx):
        spec = ctx.spec
        if not spec.brownian:
            return {"trunc_rms": None, "trunc_note": f"n/a: stochastic solver '{spec.name}' does not draw its noise "
                    "through rng.increment (spec.brownian is false), so no same-path reference is defined"}
        n = self._n(ctx)
        err, nfe, se = strong_error(spec.fn, guidance.model_of(ctx, range(n)), ctx.x_T[:n], ctx.t, ctx.cfg.get("seed", 0), range(n),
                                    self.knobs["refine"], ctx.knobs, ctx.dtype)
        return {"trunc_strong_rms": err, "trunc_strong_rms_se": se, "trunc_ref_nfe": nfe}   # strong error: its own column, not the ODE error
