"""One benchmark run: config -> model -> time steps -> solver (counted NFE) -> metrics -> one results row."""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import torch

from bench import store
from bench.metrics import MetricContext, make_metric
from models.dynamics import Dynamics
from models.errors import ConfigError
from models.netio import compile_model
from models.registry import load_model
from solvers.registry import get_solver
from solvers.rng import PerSampleRNG
from solvers.timesteps import make_timesteps

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@lru_cache(maxsize=1)
def code_version() -> str:
    """Git commit of the code (with '-dirty' when the tree has uncommitted changes)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + ("-dirty" if dirty and rev else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but no CUDA device is available; use device=cpu or device=auto.")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"Unknown device '{name}'. Valid devices are: auto, cpu, cuda (or cuda:N).")
    return torch.device(name)


def _split_knobs(node: dict, reserved=("name",)) -> dict:
    return {k: v for k, v in node.items() if k not in reserved}


def cell_key(row: dict) -> str:
    """Identity of a benchmark cell: everything that determines its numbers."""
    ident = {k: row[k] for k in ("model", "solver", "solver_knobs", "timesteps", "nfe_budget", "seed",
                                 "n_samples", "dtype", "protocols", "code_version")}
    ident["model_cfg"] = row["config"]["model"]
    ident["timesteps_cfg"] = row["config"]["timesteps"]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan(cfg: dict):
    """Validate everything the run needs before any work; returns the pieces of the run."""
    if cfg["dtype"] not in DTYPES:
        raise ConfigError(f"Unknown dtype '{cfg['dtype']}'. Valid dtypes are: {', '.join(DTYPES)}.")
    for k in ("n_samples", "batch_size"):
        if not isinstance(cfg[k], int) or cfg[k] < 1:
            raise ConfigError(f"{k} must be a positive integer, got {cfg[k]!r}")
    spec = get_solver(cfg["solver"]["name"])
    knobs = _split_knobs(cfg["solver"])
    metrics_list = list(cfg["metrics"] or [])
    metrics = [make_metric(m, (cfg.get("metric_cfg") or {}).get(m)) for m in metrics_list]
    steps = spec.steps_for(cfg["nfe"], **knobs)
    ts_cfg = dict(cfg["timesteps"])
    ts_name = ts_cfg.pop("name")
    if ts_name == "auto":
        ts_name, ts_cfg = spec.default_timesteps, {}
    model = load_model(cfg["model"])
    t = make_timesteps(ts_name, model.schedule, steps, **ts_cfg)
    return spec, knobs, metrics, steps, ts_name, ts_cfg, model, t


def generate(model, spec, knobs, t, n_samples, batch_size, seed, device, dtype, progress=False):
    """Sample n_samples with per-sample randomness; returns x_T, samples, counted NFE per batch, seconds."""
    xs_T, xs, nfes = [], [], []
    net = model.net.to(device) if hasattr(model.net, "to") else model.net
    batches = range(0, n_samples, batch_size)
    if progress and len(batches) > 1:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f"{spec.name} sampling", unit="batch", leave=False)
    t0 = time.perf_counter()
    for i in batches:
        rng = PerSampleRNG(seed, range(i, min(i + batch_size, n_samples)), device=device, dtype=dtype)
        x_T = rng.randn(model.shape) * model.schedule.prior_std()
        dyn = Dynamics(net, model.schedule)
        with torch.inference_mode():
            x0 = spec.fn(dyn, x_T, t, rng, **knobs)
        xs_T.append(x_T)
        xs.append(x0)
        nfes.append(dyn.nfe)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(xs_T), torch.cat(xs), nfes, time.perf_counter() - t0


def run(cfg: dict) -> dict:
    """Run one cell and record its row; returns the row.  Raises ConfigError before any work on bad input."""
    t_start = time.perf_counter()
    spec, knobs, metrics, steps, ts_name, ts_cfg, model, t = plan(cfg)
    device, dtype = resolve_device(cfg["device"]), DTYPES[cfg["dtype"]]
    model = compile_model(model, cfg.get("compile", False))
    x_T, samples, nfes, sampling_time = generate(model, spec, knobs, t, cfg["n_samples"], cfg["batch_size"],
                                                 cfg["seed"], device, dtype, cfg.get("progress", False))
    if len(set(nfes)) != 1:
        raise RuntimeError(f"solver '{spec.name}' spent different NFE on different batches: {nfes}")
    nfe = nfes[0]
    if nfe > cfg["nfe"]:
        raise RuntimeError(f"solver '{spec.name}' spent {nfe} NFE, over its budget of {cfg['nfe']}")
    ctx = MetricContext(cfg=cfg, model=model, spec=spec, knobs=knobs, t=t, x_T=x_T, samples=samples, device=device,
                        dtype=dtype, batch_size=cfg["batch_size"])
    values, protocols = {}, {}
    for m in metrics:
        protocols[m.name] = m.protocol(ctx)
        values.update(m.compute(ctx))
    row = {
        "status": "ok", "model": model.name, "solver": spec.name, "solver_knobs": knobs,
        "timesteps": ts_name, "nfe_budget": cfg["nfe"], "nfe": nfe, "steps": steps, "seed": cfg["seed"],
        "n_samples": cfg["n_samples"], "dtype": cfg["dtype"], "device": str(device),
        "final_step": spec.final_step, "metrics": values, "protocols": protocols,
        "sampling_time_s": sampling_time, "code_version": code_version(), "config": cfg,
    }
    row["config"] = {**cfg, "timesteps": {"name": ts_name, **ts_cfg}}
    row["key"] = cell_key(row)
    row["wall_time_s"] = time.perf_counter() - t_start
    row["id"] = store.append_row(cfg["results_dir"], {k: v for k, v in row.items() if k != "id"})
    return row


@lru_cache(maxsize=1)
def default_model() -> str | None:
    """The model named in conf/config.yaml's defaults list."""
    import yaml

    with open(REPO / "conf" / "config.yaml") as f:
        return next((d["model"] for d in yaml.safe_load(f)["defaults"] if isinstance(d, dict) and "model" in d), None)


def format_summary(row: dict) -> str:
    """A short table of one run for the terminal."""
    lines = [
        ("model", row["model"] + (" (the default; choose with model=NAME)" if row["model"] == default_model() else "")),
        ("solver", row["solver"] + (f" {row['solver_knobs']}" if row["solver_knobs"] else "")),
        ("time steps", f"{row['timesteps']} ({row['steps']} steps, final step: {row['final_step']})"),
        ("NFE (budget / counted)", f"{row['nfe_budget']} / {row['nfe']}"),
        ("samples / seed", f"{row['n_samples']} / {row['seed']}"),
    ]
    for k, v in row["metrics"].items():
        lines.append((k, f"{v:.4e}" if isinstance(v, float) else str(v)))
    lines += [("wall time", f"{row['wall_time_s']:.2f} s (sampling {row['sampling_time_s']:.2f} s)"),
              ("recorded", f"run {row['id']} in {store.db_path(row['config']['results_dir'])}")]
    w = max(len(k) for k, _ in lines)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in lines)
