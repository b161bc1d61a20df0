"""python -m bench optimize-steps: time steps optimised for one model, solver and NFE budget.

    python -m bench optimize-steps model=digits solver=dpm_solver_pp solver.order=3 nfe=6 method=gits
    python -m bench run model=digits solver=dpm_solver_pp solver.order=3 nfe=6 \
        timesteps=explicit timesteps.file=results/steps/timesteps/digits-dpm_solver_pp-nfe6-gits.yaml

The search runs on a calibration set (sample i from the generator (calib_seed, i), calib_seed 1000 by default,
disjoint from a run's default seed 0) and writes results_dir/steps/timesteps/NAME.yaml: a timesteps=explicit
config (the list `t`) with a `source` record (method, model and its config digest, solver and knobs, NFE,
calibration seed and size, wall time and network evaluations of the search).  A run given that grid carries the
record in its timesteps config, and is refused when its model, NFE or seed do not fit the search (resolve_grid).

The grid has the solver's step count for the NFE (spec.steps_for), and its points are chosen among a fine grid:
the solver's default spacing with fine_per_step (steps - 1) + 1 points, which contains the default grid itself.
Both methods score a grid by the sum over its intervals of one step's error (RMS per dimension in the state x_t,
over the calibration set), the step being the first-order DDIM step (= Euler in sigma_hat = DPM-Solver-1), as
GITS does whatever the sampler: a multistep or higher-order solver then runs on the grid found for that step.
- gits (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling", sec. 4): teacher states
  on the fine grid from x_T (a float64 dopri5 solve, the machinery of the trunc metric); cost(i, j) = error of the
  step from the teacher at t_i to t_j against the teacher at t_j; dynamic programming for the cheapest path from
  T to t_min with exactly steps - 1 intervals.  Network evaluations: the teacher's, plus one per fine point.
  The teacher (states, eps and the cost matrix) depends on neither the solver nor the NFE, only on the model, the
  calibration x_T, the fine grid and teacher_rtol: it is cached under results_dir/cache/gits_teacher/ (teacher_key),
  so every solver sharing a default spacing reuses it, and with fine_points fixed every NFE does too.
- lte (no teacher trajectories): the same step's local truncation error estimated by step doubling (Richardson:
  for a first-order step the error of the full step is twice its difference from two half steps, halved in
  lambda), started from noised data x_t = alpha x0 + sigma eps (exact samples on gmm, the train split on digits),
  i.e. from the marginal the ODE transports; coordinate descent over the interior points (each one moved to the
  fine point between its neighbours that minimises the sum), `sweeps` times, from the default grid.  This is our
  own reference-free objective, not Align Your Steps' KL bound.
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.models.errors import ConfigError

METHODS = ("gits", "lte")
COST_SOLVERS = ("ddim",)
SOURCE_TAG = "bench optimize-steps"            # source.by of an artifact: what resolve_grid checks runs against


def knob_defaults() -> dict:
    import yaml

    from bench import CONF_DIR
    with open(Path(CONF_DIR) / "optimize.yaml") as f:
        return yaml.safe_load(f)


def check_knobs(k: dict) -> dict:
    """The knobs of conf/optimize.yaml, checked before any work."""
    allowed = knob_defaults()
    unknown = sorted(set(k) - set(allowed))
    if unknown:
        raise ConfigError(f"optimize-steps: unknown knob(s) {', '.join(unknown)}; the knobs are "
                          f"{', '.join(allowed)} (conf/optimize.yaml)")
    k = {**allowed, **k}
    if k["method"] not in METHODS:
        raise ConfigError(f"optimize-steps: method must be one of {', '.join(METHODS)}, got {k['method']!r}")
    if k["cost_solver"] not in COST_SOLVERS:
        raise ConfigError(f"optimize-steps: cost_solver must be one of {', '.join(COST_SOLVERS)}, got "
                          f"{k['cost_solver']!r}")
    for key, lo in (("n_calib", 2), ("fine_per_step", 1), ("sweeps", 1), ("calib_seed", 0), ("fine_points", 2)):
        v = k[key]
        if key == "fine_points" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"optimize-steps: {key} must be an integer >= {lo}"
                              f"{' or null' if key == 'fine_points' else ''}, got {v!r}")
    if not isinstance(k["teacher_cache"], bool):
        raise ConfigError(f"optimize-steps: teacher_cache must be true or false, got {k['teacher_cache']!r}")
    r = k["teacher_rtol"]
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
        raise ConfigError(f"optimize-steps: teacher_rtol must be a number in (0, 1), got {r!r}")
    if k["name"] is not None:
        from bench.fsio import safe_name
        k["name"] = safe_name(str(k["name"]), "optimize-steps name")
    if not isinstance(k["fine_timesteps"], str):
        raise ConfigError(f"optimize-steps: fine_timesteps must be a timesteps name or auto, got {k['fine_timesteps']!r}")
    return k


# --------------------------------------------------------------------------------------------- the pieces
def dp_min_path(cost, n_edges: int) -> tuple[list[int], float]:
    """Cheapest path 0 -> M-1 through increasing indices with exactly n_edges edges, edge i -> j (i < j) costing
    cost[i, j] (GITS, Chen et al. 2024, sec. 4.2: D[k, j] = min_i D[k-1, i] + c(i, j)).  Returns (path, total)."""
    c = np.asarray(cost, dtype=np.float64)
    M = c.shape[0]
    if c.shape != (M, M):
        raise ValueError(f"cost must be square, got shape {c.shape}")
    if not 1 <= n_edges <= M - 1:
        raise ConfigError(f"a path over {M} fine points has 1 .. {M - 1} steps, {n_edges} were asked for")
    c = np.where(np.triu(np.ones((M, M), dtype=bool), 1), c, np.inf)      # only forward edges i < j
    D = np.full(M, np.inf)
    D[0] = 0.0
    back = np.zeros((n_edges + 1, M), dtype=np.int64)
    for k in range(1, n_edges + 1):
        tot = D[:, None] + c                                                # tot[i, j] = D[k-1, i] + c(i, j)
        back[k] = np.argmin(tot, axis=0)
        D = tot[back[k], np.arange(M)]
    path = [M - 1]
    for k in range(n_edges, 0, -1):
        path.append(int(back[k, path[-1]]))
    return path[::-1], float(D[M - 1])


def ddim_step(schedule, x, eps, t_from, t_to):
    """First-order step x_t -> x_s with eps frozen at t: x_s = alpha_s/alpha_t x_t + alpha_s (sigma_hat_s -
    sigma_hat_t) eps (DDIM, Song et al. 2021a, eq. 12; Euler in sigma_hat; DPM-Solver-1, Lu et al. 2022, eq. 3.7).
    t_to may be a vector (one step to each)."""
    tf = torch.as_tensor(t_from, dtype=torch.float64)
    tt = torch.as_tensor(t_to, dtype=torch.float64).reshape(-1)
    a_f, sh_f = schedule.alpha(tf), schedule.sigma_hat(tf)
    a_t, sh_t = schedule.alpha(tt), schedule.sigma_hat(tt)
    shape = (-1,) + (1,) * x.dim()
    ratio = (a_t / a_f).to(x.dtype).reshape(shape)
    coef = (a_t * (sh_t - sh_f)).to(x.dtype).reshape(shape)
    return ratio * x[None] + coef * eps[None]


def _rms_each(a, b):
    """RMS per dimension over samples and dimensions, one value per leading index of a (b broadcast)."""
    return torch.sqrt(((a.double() - b.double()) ** 2).flatten(1).mean(1))


def gits_teacher(net, schedule, x_T, fine_t, rtol: float) -> dict:
    """The data of GITS' cost (sec. 4.1): teacher states x (M, n, ...) at the fine grid (float64 dopri5 at
    rtol = atol, the trunc metric's reference_trajectory), eps at every fine point but the last (M - 1, n, ...),
    the cost matrix of the DDIM step (see ddim_costs), and the network evaluations and wall time they took."""
    from bench.metrics.trunc import reference_trajectory
    from bench.models.dynamics import Dynamics

    t0 = time.perf_counter()
    with torch.inference_mode():
        traj, nfe_teacher = reference_trajectory(net, schedule, x_T.to(torch.float64), fine_t, rtol, rtol)
        dyn = Dynamics(net, schedule)
        eps = torch.stack([dyn.eps(traj[i], float(fine_t[i])) for i in range(len(fine_t) - 1)])
    cost = torch.from_numpy(ddim_costs(schedule, traj, eps, fine_t))
    return {"x": traj.cpu(), "eps": eps.to(torch.float64).cpu(), "cost": cost, "nfe_teacher": int(nfe_teacher),
            "nfe_eps": int(dyn.nfe), "wall_time_s": time.perf_counter() - t0}


def ddim_costs(schedule, traj, eps, fine_t) -> np.ndarray:
    """cost[i, j] (i < j; inf elsewhere) = RMS of the DDIM step from the teacher at t_i to t_j against the teacher
    at t_j (GITS, sec. 4.1)."""
    M = len(fine_t)
    cost = np.full((M, M), np.inf)
    with torch.inference_mode():
        for i in range(M - 1):
            xs = ddim_step(schedule, traj[i], eps[i], fine_t[i], fine_t[i + 1:])
            cost[i, i + 1:] = _rms_each(xs, traj[i + 1:]).numpy()
    return cost


TEACHER_KIND = "gits_teacher"       # results_dir/cache/gits_teacher/<hash>.pt (bench.metrics.cache)


def teacher_key(model_cfg, model, x_T, fine_t, k: dict) -> dict:
    """What the teacher data depend on: the model (config and weights), the calibration x_T (seed, size and content),
    the fine grid (content), the teacher's tolerance and the cost step."""
    from bench.metrics.cache import model_fingerprint, tensor_hash
    ft = torch.as_tensor(fine_t, dtype=torch.float64)
    return {"model": model_cfg, "weights": model_fingerprint(model), "calib_seed": k["calib_seed"],
            "n_calib": k["n_calib"], "x_T": tensor_hash(x_T), "fine_points": len(ft),
            "fine_t": [float(ft[0]), float(ft[-1]), tensor_hash(ft)], "teacher": "dopri5", "dtype": "float64",
            "rtol": k["teacher_rtol"], "atol": k["teacher_rtol"], "cost_solver": k["cost_solver"]}


def _teacher_ok(d, M: int, x_T) -> bool:
    n_shape = tuple(x_T.shape)
    return (isinstance(d, dict) and all(torch.is_tensor(d.get(a)) for a in ("x", "eps", "cost"))
            and tuple(d["x"].shape) == (M, *n_shape) and tuple(d["eps"].shape) == (M - 1, *n_shape)
            and tuple(d["cost"].shape) == (M, M) and all(isinstance(d.get(a), (int, float))
                                                         for a in ("nfe_teacher", "nfe_eps", "wall_time_s")))


def cached_teacher(results_dir, model_cfg, model, x_T, fine_t, k: dict) -> tuple[dict, bool]:
    """(gits_teacher data, whether they came from the cache).  With k['teacher_cache'], shared by every search with
    the same teacher_key (other solvers with the same default spacing, other NFE with fine_points fixed): stored
    atomically under results_dir/cache/gits_teacher/, read with weights_only (a planted pickle or a corrupt file is
    refused and recomputed), and checked for the shapes this search needs."""
    from bench import fsio
    from bench.metrics.cache import cached, computed, key_hash
    M = len(fine_t)
    compute = lambda: gits_teacher(model.net, model.schedule, x_T, fine_t, k["teacher_rtol"])  # noqa: E731
    if not k["teacher_cache"]:
        return compute(), False
    key = teacher_key(model_cfg, model, x_T, fine_t, k)
    miss = []
    d = cached(results_dir, TEACHER_KIND, key, lambda: miss.append(1) or compute())
    if not _teacher_ok(d, M, x_T):
        path = Path(results_dir) / "cache" / TEACHER_KIND / f"{key_hash(key)}.pt"
        fsio.warn_once(f"cache:{path}", f"cache entry ({TEACHER_KIND}) '{path}' does not hold the teacher data of "
                                        f"this search; recomputing it")
        computed[TEACHER_KIND] += 1
        d, miss = compute(), [1]
        norm_key = json.loads(json.dumps(key, sort_keys=True, default=str))
        fsio.atomic_write(path, lambda f: torch.save({"key": norm_key, "value": d}, f))
    return d, not miss


class LTECost:
    """Local error of the DDIM step from t_i to t_j estimated by the embedded second-order step that shares its
    evaluations (DPM-Solver-2, Lu et al. 2022, alg. 1 with r1 = 1/2: eps taken at the lambda-midpoint of a DDIM
    half step), the pair of DPM-Solver-12, the adaptive solver of Lu et al. 2022), started from
    noised data x_t = alpha x0 + sigma eps (the same x0 and eps at every t): RMS(DDIM - DPM-Solver-2).  Lazy,
    memoised; counts evaluations."""

    def __init__(self, net, schedule, x0, noise, fine_t):
        from bench.models.dynamics import Dynamics
        self.dyn, self.s, self.x0, self.noise = Dynamics(net, schedule), schedule, x0, noise
        self.t = torch.as_tensor(fine_t, dtype=torch.float64)
        self._eps, self._cost = {}, {}

    def _x(self, i):
        t = self.t[i]
        return self.s.alpha(t).to(self.x0.dtype) * self.x0 + self.s.sigma(t).to(self.x0.dtype) * self.noise

    def _eps_at(self, i):
        if i not in self._eps:
            self._eps[i] = self.dyn.eps(self._x(i), float(self.t[i]))
        return self._eps[i]

    def __call__(self, i, j) -> float:
        if (i, j) not in self._cost:
            ti, tj = self.t[i], self.t[j]
            x, e = self._x(i), self._eps_at(i)
            tm = self.s.t_of_lambda(0.5 * (self.s.lambda_(ti) + self.s.lambda_(tj)))
            full = ddim_step(self.s, x, e, ti, tj)[0]
            xm = ddim_step(self.s, x, e, ti, tm)[0]
            second = ddim_step(self.s, x, self.dyn.eps(xm, float(tm)), ti, tj)[0]    # DPM-Solver-2 (r = 1/2)
            self._cost[(i, j)] = float(_rms_each(full[None], second)[0])
        return self._cost[(i, j)]

    @property
    def nfe(self) -> int:
        return self.dyn.nfe


def coordinate_descent(cost, path, sweeps: int):
    """Each interior point in turn moved to the index between its neighbours minimising cost(prev, c) +
    cost(c, next); `sweeps` passes (stops early when a pass changes nothing).  Returns (path, total per pass)."""
    path = list(path)
    history = [sum(cost(a, b) for a, b in zip(path, path[1:]))]
    for _ in range(sweeps):
        moved = False
        for k in range(1, len(path) - 1):
            cands = range(path[k - 1] + 1, path[k + 1])
            best = min(cands, key=lambda c: (cost(path[k - 1], c) + cost(c, path[k + 1]), c != path[k]))
            moved |= best != path[k]
            path[k] = best
        history.append(sum(cost(a, b) for a, b in zip(path, path[1:])))
        if not moved:
            break
    return path, history


def calibration_data(model, n: int, seed: int):
    """n data points for the lte objective: exact samples (gmm) or a subset of the train split drawn with seed."""
    g = torch.Generator().manual_seed(int(seed))
    if getattr(model, "data", None) is not None and hasattr(model.data, "sample"):
        return model.data.sample(n, generator=g).to(torch.float64)
    if model.real_data is None:
        raise ConfigError(f"optimize-steps method=lte needs data samples x0, and model '{model.name}' has none "
                          f"(no real_data); use method=gits.")
    data = model.real_data("train")
    if len(data) < n:
        raise ConfigError(f"optimize-steps: n_calib={n} exceeds the {len(data)} train samples of model '{model.name}'")
    return data[torch.randperm(len(data), generator=g)[:n]].to(torch.float64)


def model_digest(model_cfg) -> str:
    from bench.run import _digest
    return _digest(model_cfg)


# --------------------------------------------------------------------------------------------- the search
def _search(k, model, fine_t, start, steps, dtype, cfg=None):
    """(path, objective value, objective function of a path, record, network evaluations) of k['method']."""
    from bench.solvers.rng import PerSampleRNG
    if k["method"] == "gits":
        x_T = PerSampleRNG(k["calib_seed"], range(k["n_calib"]), dtype=torch.float64).randn(model.shape) \
            * model.schedule.prior_std()
        cfg = cfg or {}
        d, hit = cached_teacher(cfg.get("results_dir", "results"), cfg.get("model"), model, x_T, fine_t, k)
        cost = d["cost"].numpy()
        path, total = dp_min_path(cost, steps - 1)
        obj = lambda p: float(sum(cost[a, b] for a, b in zip(p, p[1:])))  # noqa: E731
        extra = {"teacher": {"method": "dopri5", "dtype": "float64", "rtol": k["teacher_rtol"],
                             "atol": k["teacher_rtol"], "nfe": d["nfe_teacher"], "eps_nfe": d["nfe_eps"],
                             "cached": hit, "wall_time_s": round(float(d["wall_time_s"]), 2)},
                 "network_evals_this_search": 0 if hit else d["nfe_teacher"] + d["nfe_eps"],
                 "objective": "sum over steps of RMS(DDIM step from the teacher at t_i - teacher at t_j), x_t space"}
        nfe = d["nfe_teacher"] + d["nfe_eps"]
    else:
        x0 = calibration_data(model, k["n_calib"], k["calib_seed"]).to(dtype)
        noise = PerSampleRNG(k["calib_seed"], range(k["n_calib"]), dtype=dtype).randn(model.shape)
        cost_fn = LTECost(model.net, model.schedule, x0, noise, fine_t)
        path, history = coordinate_descent(cost_fn, start, k["sweeps"])
        total = history[-1]
        obj = lambda p: float(sum(cost_fn(a, b) for a, b in zip(p, p[1:])))  # noqa: E731
        extra = {"sweeps": k["sweeps"], "objective_per_sweep": [float(f"{v:.6g}") for v in history],
                 "data": "exact samples" if hasattr(getattr(model, "data", None), "sample") else "train split",
                 "dtype": str(dtype).removeprefix("torch."),
                 "objective": "sum over steps of RMS(DDIM step - DPM-Solver-2 step) from noised data, x_t space"}
        nfe = cost_fn.nfe
    return path, total, obj, extra, nfe


def optimize(cfg: dict, knobs: dict) -> dict:
    """Search the grid for cfg's model, solver and nfe; returns the artifact (a timesteps=explicit config)."""
    from bench.models.netio import check_float64
    from bench.models.registry import load_model
    from bench.run import code_version, DTYPES
    from bench.solvers.registry import solver_from_cfg
    from bench.solvers.timesteps import TIMESTEPS, make_timesteps

    k = check_knobs(knobs)
    spec, sknobs = solver_from_cfg(cfg["solver"])
    steps = spec.steps_for(cfg["nfe"], **sknobs)
    default_ts = spec.default_timesteps
    fine_ts = default_ts if k["fine_timesteps"] == "auto" else k["fine_timesteps"]
    if fine_ts not in TIMESTEPS:
        raise ConfigError(f"optimize-steps: fine_timesteps '{fine_ts}' is not a time-step schedule; valid: auto, "
                          f"{', '.join(sorted(TIMESTEPS))}")
    if fine_ts == "explicit":
        raise ConfigError("optimize-steps: fine_timesteps cannot be explicit (it needs a list); use a spacing name")
    if steps < 2:
        raise ConfigError(f"optimize-steps: nfe={cfg['nfe']} gives solver '{spec.name}' {steps} point(s); nothing "
                          f"to optimise")
    dtype = DTYPES.get(cfg.get("dtype", "float32"))
    if dtype is None:
        raise ConfigError(f"Unknown dtype '{cfg.get('dtype')}'. Valid dtypes are: {', '.join(DTYPES)}.")
    model = load_model(cfg["model"])
    if getattr(model, "n_classes", None):
        raise ConfigError(f"optimize-steps: model '{model.name}' is conditional; the search uses the unconditional "
                          f"network only and is not implemented for conditional models")
    if k["method"] == "gits":
        check_float64(model)
    M = k["fine_per_step"] * (steps - 1) + 1 if k["fine_points"] is None else k["fine_points"]
    if M < steps:
        raise ConfigError(f"optimize-steps: fine_points={M} is fewer than the {steps} points of solver '{spec.name}' "
                          f"at nfe={cfg['nfe']}; use fine_points >= {steps} (or null)")
    fine_t = make_timesteps(fine_ts, model.schedule, M)
    default_t = make_timesteps(default_ts, model.schedule, steps)
    per = (M - 1) // (steps - 1)
    nested = [i * per for i in range(steps)]
    contains_default = (fine_ts == default_ts and per * (steps - 1) == M - 1
                        and bool(torch.allclose(fine_t[nested], default_t, rtol=1e-9, atol=0)))
    start = nested if contains_default else sorted({int(torch.argmin((fine_t - v).abs())) for v in default_t})
    if len(start) != steps or start[0] != 0 or start[-1] != M - 1:
        start = [round(i * (M - 1) / (steps - 1)) for i in range(steps)]
    t0 = time.perf_counter()
    with torch.inference_mode():
        path, total, obj, extra, nfe = _search(k, model, fine_t, start, steps, dtype, cfg)
        default_obj = obj(start) if contains_default else None
    wall = time.perf_counter() - t0
    t = fine_t[path]
    sig = model.schedule.sigma_hat(t)
    r6 = lambda v: float(f"{float(v):.6g}")  # noqa: E731
    source = {
        "by": SOURCE_TAG, "method": k["method"], "model": cfg["model"].get("name"),
        "model_cfg_digest": model_digest(cfg["model"]), "solver": spec.name, "solver_knobs": sknobs,
        "nfe": cfg["nfe"], "steps": steps, "cost_solver": k["cost_solver"],
        "fine_timesteps": fine_ts, "fine_points": M, "fine_indices": [int(i) for i in path],
        "default_timesteps": default_ts, "calib_seed": k["calib_seed"], "n_calib": k["n_calib"],
        "calib_indices": f"0..{k['n_calib'] - 1}",
        "search_nfe": int(nfe), "search_sample_evals": int(nfe) * k["n_calib"],
        "search_wall_time_s": round(wall, 2), "objective_value": r6(total),
        "objective_default_grid": None if default_obj is None else r6(default_obj),
        "sigma_hat": [r6(v) for v in sig], "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **extra,
    }
    return {"name": "explicit", "t": [float(v) for v in t], "sigma_hat": None, "rtol": 1e-6, "file": None,
            "source": source}


def artifact_path(results_dir, name: str) -> Path:
    from bench.fsio import inside
    rel = f"steps/timesteps/{name}.yaml"
    inside(results_dir, rel, "optimize-steps artifact")          # stays inside results_dir
    return Path(results_dir) / rel


def write_artifact(results_dir, name: str, art: dict) -> Path:
    import yaml

    from bench.fsio import atomic_write_text
    s = art["source"]
    path = artifact_path(results_dir, name)
    head = (f"# Time steps optimised by `{SOURCE_TAG}` (method {s['method']}) for model '{s['model']}', solver "
            f"'{s['solver']}', nfe={s['nfe']}.\n# Use: python -m bench run model={s['model']} solver={s['solver']} "
            f"nfe={s['nfe']} timesteps=explicit timesteps.file={path}\n#  or: python -m bench run ... "
            f"hydra.searchpath=[file://{path.parent.parent}] timesteps={name}\n")
    atomic_write_text(path, head + yaml.safe_dump(art, sort_keys=False, default_flow_style=None, width=120))
    return path


# --------------------------------------------------------------------------------------------- runs using a grid
def load_artifact(path) -> dict:
    from bench.solvers.timesteps import load_grid_file
    return load_grid_file(path)


def resolve_grid(cfg: dict) -> dict:
    """A run's config with timesteps.file read into the explicit list and its `source` (so the cell's identity
    holds the grid and its search), then checked: a grid searched by optimize-steps must be used with the model
    (same config digest) and NFE it was searched for (another solver: the NFE that gives it the grid's number of
    points, as GITS transfers a grid), and evaluation seeds disjoint from its calibration seeds.
    Configs without such a grid pass unchanged.  Idempotent."""
    ts = cfg.get("timesteps") or {}
    if ts.get("name") != "explicit" or (ts.get("file") is None and ts.get("source") is None):
        return cfg
    ts = dict(ts)
    if ts.get("file") is not None:
        if ts.get("t") is not None or ts.get("sigma_hat") is not None:
            raise ConfigError("timesteps 'explicit': give the grid either as timesteps.file or as t / sigma_hat, "
                              "not both")
        art = load_artifact(ts["file"])
        src = art.get("source")
        ts.update(t=art.get("t"), sigma_hat=art.get("sigma_hat"), file=None,
                  source={**src, "artifact": str(ts["file"])} if isinstance(src, dict) else src)
        cfg = {**cfg, "timesteps": ts}
    src = ts.get("source")
    if src is None:
        return cfg
    if not isinstance(src, dict):
        raise ConfigError(f"timesteps.source must be the mapping an optimize-steps artifact records, got {src!r}")
    if src.get("by") != SOURCE_TAG:
        return cfg                                   # a user's own note: recorded, not checked
    what = f"the grid {src.get('artifact', '')!s} searched by optimize-steps (method {src.get('method')})".replace("  ", " ")
    model = (cfg.get("model") or {}).get("name")
    if src.get("model") != model or src.get("model_cfg_digest") != model_digest(cfg.get("model")):
        raise ConfigError(f"{what} was optimised for model '{src.get('model')}' (config digest "
                          f"{src.get('model_cfg_digest')}), and this run's model is '{model}' (digest "
                          f"{model_digest(cfg.get('model'))}); search a grid for this model with python -m bench "
                          f"optimize-steps model=...")
    from bench.solvers.registry import solver_from_cfg
    spec, sknobs = solver_from_cfg(cfg.get("solver"))
    if spec.name == src.get("solver") and src.get("nfe") != cfg.get("nfe"):
        raise ConfigError(f"{what} was optimised for nfe={src.get('nfe')}, and this run has nfe={cfg.get('nfe')}; "
                          f"use nfe={src.get('nfe')} or search a grid for nfe={cfg.get('nfe')}")
    if isinstance(cfg.get("nfe"), int) and spec.steps_for(cfg["nfe"], **sknobs) != src.get("steps"):
        raise ConfigError(f"{what} was optimised for nfe={src.get('nfe')} of solver '{src.get('solver')}' "
                          f"({src.get('steps')} points), and solver '{spec.name}' takes "
                          f"{spec.steps_for(cfg['nfe'], **sknobs)} points at nfe={cfg.get('nfe')}; choose the nfe "
                          f"that gives it {src.get('steps')} points, or search a grid for this solver and nfe")
    seed, n = cfg.get("seed"), cfg.get("n_samples")
    c_seed, c_n = src.get("calib_seed"), src.get("n_calib")
    if seed == c_seed and isinstance(n, int) and isinstance(c_n, int) and min(n, c_n) > 0:
        raise ConfigError(f"{what} was calibrated on samples 0..{c_n - 1} of seed {c_seed}, and this run evaluates "
                          f"samples 0..{n - 1} of the same seed: evaluation samples overlap the calibration set. "
                          f"Use another seed (e.g. seed=0) or search with another optimize-steps calib_seed.")
    return cfg


# --------------------------------------------------------------------------------------------- command line
USAGE = """usage: python -m bench optimize-steps model=NAME solver=NAME nfe=N[,N...] [method=gits|lte] [knob=value ...]
                                       [any override of `run`: solver.order=3, results_dir=DIR, dtype=...]

Searches a time grid for the model, solver and NFE on a calibration set and writes
results_dir/steps/timesteps/NAME.yaml, usable as `timesteps=explicit timesteps.file=PATH`.
Several budgets (nfe=4,5,6) are searched one after the other; with fine_points=M they share one teacher.
Knobs (conf/optimize.yaml): """


def split_args(args) -> tuple[dict, list[str]]:
    """optimize knobs (method=gits or optimize.method=gits) and the other overrides (for Hydra's compose)."""
    import yaml
    names = set(knob_defaults())
    knobs, overrides = {}, []
    for a in args:
        key, eq, val = a.partition("=")
        key = key.removeprefix("optimize.")
        if eq and key in names:
            try:
                knobs[key] = yaml.safe_load(val) if val != "" else None
            except yaml.YAMLError:
                knobs[key] = val
        else:
            overrides.append(a)
    return knobs, overrides


def main(args=None) -> int:
    import sys

    from bench import fsio
    from bench.__main__ import check_group_choices, check_overrides
    from bench.api import config

    args = list(sys.argv[1:] if args is None else args)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE + ", ".join(knob_defaults()))
        return 0
    knobs, overrides = split_args(args)
    k = check_knobs(knobs)
    err = check_overrides(overrides) or check_group_choices(overrides)
    if err:
        raise ConfigError(err)
    budgets = nfe_budgets(overrides)
    if len(budgets) > 1 and k["name"] is not None:
        raise ConfigError(f"optimize-steps: name={k['name']} names one artifact, and nfe={','.join(budgets)} asks "
                          f"for {len(budgets)}; drop name= (each is then MODEL-SOLVER-nfeN-METHOD)")
    cfgs = [config(*[a for a in overrides if a.partition("=")[0] != "nfe"], *([f"nfe={n}"] if n else []))
            for n in budgets]
    from bench.solvers.registry import solver_from_cfg
    for cfg in cfgs:                                  # every budget and name checked before the first search
        fsio.check_results_dir(cfg["results_dir"])
        spec, sknobs = solver_from_cfg(cfg["solver"])
        spec.steps_for(cfg["nfe"], **sknobs)
        artifact_path(cfg["results_dir"], _artifact_name(cfg, spec, k))
    for cfg in cfgs:
        name = _artifact_name(cfg, solver_from_cfg(cfg["solver"])[0], k)
        t0 = time.perf_counter()
        art = optimize(cfg, k)
        path = write_artifact(cfg["results_dir"], name, art)
        s = art["source"]
        cache = ""
        if "teacher" in s:
            cache = (f"; teacher {'from the cache' if s['teacher']['cached'] else 'computed'} ({s['teacher']['nfe']} + "
                     f"{s['teacher']['eps_nfe']} NFE, {s['teacher']['wall_time_s']:.1f} s when computed)")
        print(f"wrote {path}\n  method {s['method']}: {s['steps']} points on a fine grid of {s['fine_points']} "
              f"({s['fine_timesteps']}); sigma_hat = {s['sigma_hat']}\n  objective {s['objective_value']:.4g} "
              f"(default {s['default_timesteps']} grid: {s['objective_default_grid']})\n  search: "
              f"{s['search_wall_time_s']:.1f} s, {s['search_nfe']} NFE x {s['n_calib']} calibration samples "
              f"(seed {s['calib_seed']}){cache}; total {time.perf_counter() - t0:.1f} s")
    return 0


def _artifact_name(cfg, spec, k) -> str:
    return k["name"] or f"{cfg['model'].get('name')}-{spec.name}-nfe{cfg['nfe']}-{k['method']}"


def nfe_budgets(overrides) -> list[str]:
    """The budgets of an nfe=4,5,6 override (one search each, in order; they share a cached teacher where their
    fine grids agree, see fine_points); [''] when nfe is not overridden (the config's default)."""
    vals = [a.partition("=")[2] for a in overrides if a.partition("=")[0] == "nfe"]
    if not vals:
        return [""]
    out = [v.strip() for v in vals[-1].split(",")]
    if not all(v.isdigit() for v in out):
        raise ConfigError(f"optimize-steps: nfe must be an integer or a comma-separated list of them (nfe=4,5,6), "
                          f"got nfe={vals[-1]}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
