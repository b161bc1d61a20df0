"""One benchmark run: config -> model -> time steps -> solver (counted NFE) -> metrics -> one results row."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from bench import fsio, guidance, store
from bench.fastpath import cell_label, code_version, config_digest  # noqa: F401  (re-exported)
from bench.metrics import MetricContext, make_metric
from bench.models.dynamics import Dynamics
from bench.models.errors import ConfigError
from bench.models.netio import check_float64, compile_model
from bench.models.registry import load_model
from bench.solvers.registry import solver_from_cfg
from bench.solvers.rng import PerSampleRNG
from bench.solvers.timesteps import fixed_points, grid_record, make_timesteps
from bench import CONF_DIR

log = logging.getLogger("bench")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but no CUDA device is available; use device=cpu or device=auto.")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"Unknown device '{name}'. Valid devices are: auto, cpu, cuda (or cuda:N).")
    return torch.device(name)


CELL_FIELDS = ("model", "model_cfg", "solver", "solver_knobs", "timesteps", "timesteps_cfg", "nfe_budget", "seed",
               "n_samples", "dtype", "metric_protocol")
OPTIONAL_FIELDS = ("solver_source", "guidance")   # only in the identity of cells that have them (keys of other cells unchanged)


# Config keys added after cells were first recorded, at the value that reproduces the earlier behaviour: left out of
# the identity there, so a cell recorded before a key existed keeps its id (`bench compare` still matches it).
MODEL_NEUTRAL = {"parametrization": ("eps", None), "conditional": (False, None),
                 "real_data": lambda v: not (v or {}).get("path"),
                 "feature_net": lambda v: not any((v or {}).values()),
                 "guidance_classifier": lambda v: True,   # in the guidance identity, when a run uses it
                 "schedule": {"zero_terminal_snr": (False, None)}}
TIMESTEPS_NEUTRAL = {"file": (None,), "source": (None,)}


def _without_neutral(d, neutral: dict):
    """d without the keys whose value is neutral (a tuple of values, a predicate, or a nested table for a dict)."""
    if not isinstance(d, dict):
        return d
    out = {}
    for k, v in d.items():
        rule = neutral.get(k)
        if isinstance(rule, dict):
            out[k] = _without_neutral(v, rule)
        elif rule is not None and (rule(v) if callable(rule) else v in rule):
            continue
        else:
            out[k] = v
    return out


def cell_identity(cfg: dict) -> dict:
    """What determines a cell's numbers, from the config alone (so a rerun can skip before any work):
    model and its config, solver and knobs, time steps, NFE budget, seed, sample count, dtype, and the metric
    protocol (the metrics chosen with their knobs), plus the code version.  Raises ConfigError on bad names."""
    spec, knobs = solver_from_cfg(cfg["solver"])
    ts_cfg = dict(cfg["timesteps"])
    ts_name = ts_cfg.pop("name")
    if ts_name == "auto":
        ts_name, ts_cfg = spec.default_timesteps, {}
    metric_cfg = cfg.get("metric_cfg") or {}
    extra = {}
    if spec.source:       # a solver defined outside this package: its function and declared NFE are part of the cell
        extra["solver_source"] = {"fn": spec.source, "nfe": spec.nfe_formula}
    extra.update(guidance.identity(cfg))   # guidance_scale and labels, when not at their defaults
    return {
        **extra,
        "model": cfg["model"].get("name"), "model_cfg": _without_neutral(cfg["model"], MODEL_NEUTRAL),
        "solver": spec.name, "solver_knobs": knobs, "timesteps": ts_name,
        "timesteps_cfg": _without_neutral(ts_cfg, TIMESTEPS_NEUTRAL),
        "nfe_budget": cfg["nfe"], "seed": cfg["seed"], "n_samples": cfg["n_samples"], "dtype": cfg["dtype"],
        "metric_protocol": {m: metric_cfg.get(m) for m in sorted(cfg["metrics"] or [])},
        "code_version": code_version(),
    }


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_key(ident: dict) -> str:
    """Key of a cell: hash of its whole identity (code version included)."""
    return _digest({k: ident[k] for k in (*CELL_FIELDS, *OPTIONAL_FIELDS, "code_version") if k in ident})


def cell_id(ident: dict) -> str:
    """The cell without its code version: what `bench compare` matches across versions."""
    return _digest({k: ident[k] for k in (*CELL_FIELDS, *OPTIONAL_FIELDS) if k in ident})


def check_top(cfg: dict) -> None:
    """The top-level knobs of conf/config.yaml, checked before anything else."""
    if cfg.get("dtype") not in DTYPES:
        raise ConfigError(f"Unknown dtype '{cfg.get('dtype')}'. Valid dtypes are: {', '.join(DTYPES)}.")
    for k in ("n_samples", "batch_size", "nfe"):
        v = cfg.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{k} must be a positive integer, got {v!r}")
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be an integer in 0 .. 2**63 - 1 (sample i uses the generator (seed, i)), "
                          f"got {seed!r}")
    for k, lo in (("num_shards", 1), ("workers", 1), ("save_samples", 0)):
        v = cfg.get(k, lo)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"{k} must be an integer >= {lo}, got {v!r}")
    si = cfg.get("shard_index")
    if si is not None and (not isinstance(si, int) or isinstance(si, bool) or not 0 <= si < cfg.get("num_shards", 1)):
        raise ConfigError(f"shard_index must be null or an integer in 0 .. num_shards-1 = "
                          f"{cfg.get('num_shards', 1) - 1}, got {si!r}")
    fsio.check_results_dir(cfg.get("results_dir"))
    for k in ("force", "progress"):
        if not isinstance(cfg.get(k, False), bool):
            raise ConfigError(f"{k} must be true or false, got {cfg.get(k)!r}")
    m = cfg.get("metrics")
    if m is not None and (not isinstance(m, list) or not all(isinstance(x, str) for x in m)):
        raise ConfigError(f"metrics must be a list of metric names, e.g. 'metrics=[trunc,fid]', got {m!r}")


def plan(cfg: dict):
    """Validate everything the run needs before any work; returns the pieces of the run."""
    if cfg["dtype"] not in DTYPES:
        raise ConfigError(f"Unknown dtype '{cfg['dtype']}'. Valid dtypes are: {', '.join(DTYPES)}.")
    from bench.optimize_steps import resolve_grid
    cfg = resolve_grid(cfg)             # timesteps.file read in; an optimised grid's model, NFE and seeds checked
    for k in ("n_samples", "batch_size"):
        if not isinstance(cfg[k], int) or cfg[k] < 1:
            raise ConfigError(f"{k} must be a positive integer, got {cfg[k]!r}")
    spec, knobs = solver_from_cfg(cfg["solver"])
    metrics_list = list(cfg["metrics"] or [])
    metrics = [make_metric(m, (cfg.get("metric_cfg") or {}).get(m)) for m in metrics_list]
    steps = spec.steps_for(cfg["nfe"], **knobs)
    ts_cfg = dict(cfg["timesteps"])
    ts_name = ts_cfg.pop("name")
    if ts_name == "auto":
        ts_name, ts_cfg = spec.default_timesteps, {}
    if (n_fixed := fixed_points(ts_name, **ts_cfg)) is not None:
        steps = spec.check_steps(n_fixed, cfg["nfe"], **knobs)     # an explicit list fixes the step count
    model = load_model(cfg["model"])
    t = make_timesteps(ts_name, model.schedule, steps, **ts_cfg)   # a non-finite grid is a ConfigError here
    ts_cfg = {**ts_cfg, **grid_record(model.schedule, t)}          # the sigma_hat range used, for the row
    if cfg["dtype"] == "float64" or ("trunc" in metrics_list and not spec.stochastic):
        check_float64(model)                                       # a float64 reference needs a float64 network
    return spec, knobs, metrics, steps, ts_name, ts_cfg, model, t


def generate(model, spec, knobs, t, n_samples, batch_size, seed, device, dtype, progress=False, indices=None,
             cond=None, times=None):
    """Sample with per-sample randomness (sample i from its own generator (seed, i)); `indices` picks which of
    the n_samples (default all); `cond` (bench.guidance.Conditioning) gives each batch its guided eps from its
    sample indices.  Returns x_T, samples, counted NFE per batch, seconds spent in the solver alone (issue 17);
    `times`, a dict, also receives 'setup_s' (generators, x_T, wrappers) and 'sampling_s'."""
    indices = list(range(n_samples) if indices is None else indices)
    xs_T, xs, nfes = [], [], []
    net = model.net.to(device) if hasattr(model.net, "to") else model.net
    batches = range(0, len(indices), batch_size)
    if progress and len(batches) > 1:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f"{spec.name} sampling", unit="batch", leave=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    setup_s = sampling_s = 0.0
    for i in batches:
        t0 = time.perf_counter()
        rng = PerSampleRNG(seed, indices[i:i + batch_size], device=device, dtype=dtype)
        x_T = rng.randn(model.shape) * model.schedule.prior_std()
        eps = cond.wrap(net, indices[i:i + batch_size]) if cond is not None else net
        dyn = Dynamics(eps, model.schedule)
        sync()
        t1 = time.perf_counter()
        with torch.inference_mode():
            x0 = spec.fn(dyn, x_T, t, rng, **knobs)
        sync()
        setup_s, sampling_s = setup_s + t1 - t0, sampling_s + time.perf_counter() - t1
        if cond is not None:
            cond.forwards.append(eps.forwards)
            if cond.classifier is not None:
                cond.classifier_evals.append(eps.classifier_evals)
        xs_T.append(x_T)
        xs.append(x0)
        nfes.append(dyn.nfe)
    if times is not None:
        times.update(setup_s=setup_s, sampling_s=sampling_s)
    return torch.cat(xs_T), torch.cat(xs), nfes, sampling_s


class FiniteWatch:
    """Wraps the network and notes the first evaluation whose input or output is not finite: (kind, its time,
    the times of the evaluations before it)."""

    def __init__(self, net):
        self.net, self.first, self.times = net, None, []

    def __call__(self, x, t):
        out = self.net(x, t)
        tau = float(t.reshape(-1)[0])
        if self.first is None:
            if not bool(torch.isfinite(x).all()):
                self.first = ("input", tau, list(self.times))
            elif not bool(torch.isfinite(out).all()):
                self.first = ("output", tau, list(self.times))
            self.times.append(tau)
        return out


def _same_time(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(b), 1e-12)     # a grid time recomputed through sigma_hat or lambda


def step_of(t, where: str, t_eval: float | None, spec=None, before=(), **knobs) -> int:
    """1-based step whose output is the first non-finite state (step k goes from t[k-1] to t[k], the last one to
    sigma_hat = 0), from the first evaluation with a non-finite input or output.

    An evaluation at grid time t[m] is the `call`-th there (counted in `before`, the earlier evaluation times); the first spec.end_evals of them end step m (Heun's
    corrector, UniPC's free evaluation, pc's Langevin steps), the others start step m+1.  A non-finite output
    spoils the step the evaluation belongs to; a non-finite input at the first evaluation of a step was made by
    the step before.  Off the grid, an evaluation inside (t[k], t[k-1]) belongs to step k, or to step k+1 for a
    churned first stage (EDM)."""
    n = len(t)
    if t_eval is None:
        return n
    tg = t.double().tolist()
    on_grid = [m for m, tm in enumerate(tg) if _same_time(t_eval, tm)]
    if on_grid:
        m = on_grid[0]
        call = sum(1 for b in before if _same_time(b, tg[m]))
        ends = spec.end_evals_at(m, n, **knobs) if (spec is not None and m >= 1) else 0
        owner = m if call < ends else m + 1              # the step this evaluation belongs to
        if where == "input":          # the state fed to it (x_m, or step m's predictor) was made by step m
            return max(1, m)
        return min(max(owner, 1), n)
    k = sum(1 for tm in tg if tm > t_eval)               # t_eval in (t[k], t[k-1])
    if spec is not None and spec.churn:
        return min(k + 1, n) if where == "output" else max(k, 1)
    return max(k, 1)


def locate_divergence(model, spec, knobs, t, seed, indices, device, dtype, cond=None) -> int:
    """Re-run the samples that diverged with a finiteness check on every network call; returns the step."""
    net = model.net.to(device) if hasattr(model.net, "to") else model.net
    net = cond.wrap(net, indices) if cond is not None else net
    watch = FiniteWatch(net)
    rng = PerSampleRNG(seed, indices, device=device, dtype=dtype)
    x_T = rng.randn(model.shape) * model.schedule.prior_std()
    with torch.inference_mode():
        spec.fn(Dynamics(watch, model.schedule), x_T, t, rng, **knobs)
    where, t_eval, before = watch.first or ("output", None, [])
    return step_of(t, where, t_eval, spec, before, **knobs)


def shard_indices(n_samples: int, num_shards: int, shard_index: int) -> range:
    """Contiguous block of sample indices of one shard (sample i's noise depends only on (seed, i))."""
    lo = n_samples * shard_index // num_shards
    return range(lo, n_samples * (shard_index + 1) // num_shards)


def _shard_worker(cfg: dict, k: int):
    """Process-pool entry: one thread per worker process, then _shard_job."""
    torch.set_num_threads(1)
    return _shard_job(cfg, k)


def _shard_job(cfg: dict, k: int):
    """Generate shard k of cfg in this process."""
    spec, knobs, _, _, _, _, model, t = plan(cfg)
    device, dtype = resolve_device(cfg["device"]), DTYPES[cfg["dtype"]]
    idx = shard_indices(cfg["n_samples"], cfg["num_shards"], k)
    times = {}
    cond = guidance.conditioning(cfg, model)
    x_T, x, nfes, secs = generate(model, spec, knobs, t, cfg["n_samples"], cfg["batch_size"], cfg["seed"],
                                  device, dtype, indices=idx, cond=cond, times=times)
    # the guided network's forwards and the classifier's evaluations per sample of each batch, as counted
    counts = {} if cond is None else {"forwards": list(cond.forwards), "classifier_evals": list(cond.classifier_evals)}
    return {"x_T": x_T.cpu(), "samples": x.cpu(), "nfes": nfes, "seconds": secs, "indices": list(idx),
            "setup_seconds": times["setup_s"], **counts}


def _shard_path(cfg: dict, key: str, k: int) -> Path:
    return Path(cfg["results_dir"]) / "shards" / key / f"{k}-of-{cfg['num_shards']}.pt"


def _save_atomic(path: Path, write) -> None:
    fsio.atomic_write(path, write)


def generate_sharded(cfg: dict, key: str, device, dtype, times=None):
    """All samples of a cell from its shards: shard files already on disk (written by runs with shard_index=k,
    e.g. on other machines) are loaded, the rest generated here in `workers` processes.  Results do not
    depend on the sharding because every sample has its own generator.  `times` receives 'setup_s' (the
    slowest shard's; shard files written before issue 17 count 0), and 'forwards' and 'classifier_evals', the counts
    per batch of every shard, when every shard file has them (files written before they were recorded do not)."""
    n = cfg["num_shards"]
    parts, todo = {}, []
    for k in range(n):
        p = _shard_path(cfg, key, k)
        part = None
        if p.exists():
            try:
                part = fsio.load_torch(p, "shard file")
                if not isinstance(part, dict) or not {"x_T", "samples", "nfes", "seconds", "indices"} <= set(part):
                    raise fsio.UnsafeFile(f"shard file '{p}' does not hold a shard")
            except fsio.UnsafeFile as e:
                fsio.warn_once(f"shard:{p}", f"{e}; regenerating shard {k}")
                part = None
        if part is not None:
            parts[k] = part
        else:
            todo.append(k)
    if todo and cfg.get("workers", 1) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(cfg["workers"], len(todo)), mp_context=mp.get_context("spawn")) as ex:
            for k, part in zip(todo, ex.map(_shard_worker, [cfg] * len(todo), todo)):
                parts[k] = part
    else:
        for k in todo:
            parts[k] = _shard_job(cfg, k)
    parts = [parts[k] for k in range(n) if len(parts[k]["indices"])]
    cat = lambda f: torch.cat([p[f] for p in parts]).to(device, dtype)  # noqa: E731
    if times is not None:
        times["setup_s"] = max(p.get("setup_seconds", 0.0) for p in parts)
        for f in ("forwards", "classifier_evals"):
            if all(f in p for p in parts):
                times[f] = [v for p in parts for v in p[f]]
    return (cat("x_T"), cat("samples"), [v for p in parts for v in p["nfes"]],
            max(p["seconds"] for p in parts))


def save_samples(cfg: dict, key: str, samples) -> str | None:
    """Keep the first `save_samples` samples as results_dir/samples/<key>.npz; returns the path relative to results_dir."""
    k = int(cfg.get("save_samples", 0) or 0)
    if k <= 0:
        return None
    rel = f"samples/{key}.npz"
    x = samples[:k].detach().cpu().float().numpy()
    _save_atomic(Path(cfg["results_dir"]) / rel, lambda f: np.savez_compressed(f, samples=x))
    return rel


def run(cfg: dict, force: bool | None = None) -> dict:
    """Run one cell and record its row; returns the row.

    A cell already recorded (status ok or diverged) is skipped before any work unless force; bad input raises
    ConfigError before any work and records nothing; NaN/Inf in the samples records status 'diverged' with the
    step; any other error records status 'failed' with the message."""
    t_start = time.perf_counter()
    check_top(cfg)
    digest = config_digest(cfg)              # of the config as given (bench.fastpath: a rerun's skip without torch)
    from bench.optimize_steps import resolve_grid
    cfg = resolve_grid(cfg)   # the grid of timesteps.file in the cell's identity; calibration seeds refused (ConfigError)
    store.open_store(cfg["results_dir"])      # before any work: a directory that cannot hold the store fails now
    force = bool(cfg.get("force", False)) if force is None else force
    ident = cell_identity(cfg)
    key = cell_key(ident)
    head = {"key": key, "cell": cell_id(ident), "model": ident["model"], "solver": ident["solver"],
            "solver_knobs": ident["solver_knobs"], "timesteps": ident["timesteps"], "nfe_budget": cfg["nfe"],
            "seed": cfg["seed"], "n_samples": cfg["n_samples"], "dtype": cfg["dtype"],
            "code_version": ident["code_version"], "config_digest": digest}
    if not force:
        done = store.find_done(cfg["results_dir"], key)
        if done:
            return {**head, "status": "skipped", "reason": f"already recorded (run {done['id']}, {done['status']})"}
    num_shards, shard_index = int(cfg.get("num_shards", 1) or 1), cfg.get("shard_index")
    if num_shards < 1 or (shard_index is not None and not 0 <= shard_index < num_shards):
        raise ConfigError(f"shard_index must be null or in 0..num_shards-1 and num_shards >= 1, "
                          f"got shard_index={shard_index!r}, num_shards={num_shards!r}")
    spec, knobs, metrics, steps, ts_name, ts_cfg, model, t = plan(cfg)
    cond = guidance.conditioning(cfg, model)     # guidance / labels / metrics checked before any work
    if cond is not None:
        if cond.conditional:
            head["guidance_scale"] = cond.guidance_scale
        if cond.classifier is not None:
            head.update(classifier_scale=cond.classifier_scale, classifier=cond.classifier.name)
    device, dtype = resolve_device(cfg["device"]), DTYPES[cfg["dtype"]]
    model = compile_model(model, cfg.get("compile", False))
    config = {**cfg, "timesteps": {"name": ts_name, **ts_cfg}}
    row = {**head, "steps": steps, "device": str(device), "final_step": spec.final_step_at(**knobs), "metrics": {},
           "protocols": {}, "sample_shape": list(model.shape), "config": config}
    if shard_index is not None:
        part = _shard_job({**cfg, "num_shards": num_shards}, shard_index)
        path = _shard_path({**cfg, "num_shards": num_shards}, key, shard_index)
        _save_atomic(path, lambda f: torch.save(part, f))
        return {**row, "status": "shard", "reason": f"wrote {len(part['indices'])} samples to {path}"}
    try:
        if num_shards > 1:
            times = {}
            x_T, samples, nfes, sampling_time = generate_sharded({**cfg, "num_shards": num_shards}, key, device, dtype,
                                                                 times)
            if cond is not None:                       # the shards' counts (absent from older shard files)
                cond.forwards.extend(times.get("forwards", []))
                cond.classifier_evals.extend(times.get("classifier_evals", []))
        else:
            times = {}
            x_T, samples, nfes, sampling_time = generate(model, spec, knobs, t, cfg["n_samples"], cfg["batch_size"],
                                                         cfg["seed"], device, dtype, cfg.get("progress", False),
                                                         cond=cond, times=times)
        row["setup_time_s"] = times["setup_s"]          # generators and x_T: not in sampling_time_s (issue 17)
        if len(set(nfes)) != 1 and not spec.batch_coupled:
            raise RuntimeError(f"solver '{spec.name}' spent different NFE on different batches: {nfes}")
        nfe = max(nfes)       # adaptive (batch-coupled) solvers: each batch's count is kept in nfe_batches
        if len(set(nfes)) != 1:
            row["nfe_batches"] = nfes
        spec.check_counted(nfe, steps, **knobs)
        if nfe > cfg["nfe"]:
            raise RuntimeError(f"solver '{spec.name}' spent {nfe} NFE, over its budget of {cfg['nfe']}")
        row.update(nfe=nfe, sampling_time_s=sampling_time)
        if cond is not None:   # network forwards per sample: 2 per guided NFE (cond + uncond in one call)
            row["nfe_forwards"] = max(cond.forwards) if cond.forwards else nfe * cond.forwards_per_eval
            if cond.classifier is not None:   # counted by ClassifierGuided (shard files from before: nfe x per NFE)
                row["classifier_evals"] = (max(cond.classifier_evals) if cond.classifier_evals
                                           else nfe * cond.classifier_evals_per_eval)
        bad = ~torch.isfinite(samples.reshape(samples.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            first = [int(i) for i in torch.nonzero(bad).flatten()[: cfg["batch_size"]]]
            row.update(status="diverged", n_diverged=int(bad.sum()),
                       diverged_step=locate_divergence(model, spec, knobs, t, cfg["seed"], first, device, dtype,
                                                       cond))
        else:
            ctx = MetricContext(cfg=cfg, model=model, spec=spec, knobs=knobs, t=t, x_T=x_T, samples=samples,
                                device=device, dtype=dtype, batch_size=cfg["batch_size"])
            for m in metrics:
                row["protocols"][m.name] = m.protocol(ctx)
                row["metrics"].update(m.compute(ctx))
            row["status"] = "ok"
            row["samples_path"] = save_samples(cfg, key, samples)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001  (recorded, so that a sweep goes on)
        log.exception("cell %s failed", key)
        row.update(status="failed", error=f"{type(e).__name__}: {e}")
    row["wall_time_s"] = time.perf_counter() - t_start
    try:
        rid = store.record(cfg["results_dir"], row, force=force)
    except store.StoreError as e:
        log.error("%s", e)
        return {**row, "id": None, "unrecorded": str(e)}
    if rid is None:
        return {**row, "status": "skipped", "reason": "recorded meanwhile by another worker"}
    row["id"] = rid
    return row


@lru_cache(maxsize=1)
def default_model() -> str | None:
    """The model named in conf/config.yaml's defaults list."""
    import yaml

    with open(CONF_DIR / "config.yaml") as f:
        return next((d["model"] for d in yaml.safe_load(f)["defaults"] if isinstance(d, dict) and "model" in d), None)


def format_summary(row: dict) -> str:
    """A short table of one run for the terminal (one line for a skipped, failed or diverged cell)."""
    st = row["status"]
    if row.get("unrecorded"):
        return f"  {st}, NOT recorded: {cell_label(row)}: {row['unrecorded']}"
    if st in ("skipped", "shard"):
        return f"  {st}: {cell_label(row)}: {row['reason']}"
    if st == "failed":
        return f"  failed: {cell_label(row)}: {row['error']}  (recorded as run {row['id']})"
    if st == "diverged":
        return (f"  diverged: {cell_label(row)}: {row['n_diverged']} of {row['n_samples']} samples not finite, "
                f"first at step {row['diverged_step']} of {row['steps']}  (recorded as run {row['id']})")
    lines = [
        ("model", row["model"] + (" (the default; choose with model=NAME)" if row["model"] == default_model() else "")),
        ("solver", row["solver"] + (f" {row['solver_knobs']}" if row["solver_knobs"] else "")),
        ("time steps", f"{row['timesteps']} ({row['steps']} steps, final step: {row['final_step']})"),
        ("NFE (budget / counted)", f"{row['nfe_budget']} / {row['nfe']}"),
        ("samples / seed", f"{row['n_samples']} / {row['seed']}"),
    ]
    for k, v in row["metrics"].items():
        lines.append((k, f"{v:.4e}" if isinstance(v, float) else str(v)))
    setup = f", set-up {row['setup_time_s']:.2f} s" if row.get("setup_time_s") is not None else ""
    lines += [("wall time", f"{row['wall_time_s']:.2f} s (sampling {row['sampling_time_s']:.2f} s{setup})"),
              ("recorded", f"run {row['id']} in {store.db_path(row['config']['results_dir'])}")]
    if row.get("nfe_batches"):
        lines.insert(4, ("NFE per batch", str(row["nfe_batches"])))
    if row.get("guidance_scale") is not None:
        lines.insert(4, ("guidance scale / forwards", f"{row['guidance_scale']:g} / {row.get('nfe_forwards')} "
                                                      f"network forwards per sample"))
    if row.get("classifier_scale") is not None:
        lines.insert(5, ("classifier guidance", f"s = {row['classifier_scale']:g} with {row.get('classifier')}, "
                                                f"{row.get('classifier_evals')} classifier evaluations per sample "
                                                f"(not in NFE)"))
    w = max(len(k) for k, _ in lines)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in lines)
