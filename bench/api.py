"""The Python API: the benchmark without Hydra's command line.

    import bench
    model = bench.load_model("gmm")                                    # by name (conf/model/gmm.yaml) or a config dict
    out = bench.sample(model, "dpm_solver_pp", nfe=10, n_samples=64, seed=0, order=3)   # counted NFE
    out.x0.shape, out.nfe, out.steps
    bench.compute_metrics(out, ["trunc", "fid"])                       # {'trunc_rms': ..., 'fid': ...}
    df = bench.run_cells([{"solver": s, "nfe": n} for s in ("euler", "heun") for n in (10, 20)],
                         model="gmm", n_samples=64, results_dir="results/api")   # one row per cell

Configs come from the same YAML files as the command line (conf/ and any `searchpath` directories), so a
cell run here and the same cell run as `python -m bench run ...` have the same key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from bench.models.errors import ConfigError
from bench.solvers.registry import get_solver, register_solver

__all__ = ["config", "load_model", "get_solver", "register_solver", "sample", "compute_metrics", "run_cell",
           "run_cells", "load_runs", "SampleResult", "ConfigError"]

GROUPS = ("model", "solver", "timesteps", "metric_cfg")


def _searchpath_override(searchpath) -> list[str]:
    dirs = [searchpath] if isinstance(searchpath, (str, Path)) else list(searchpath or ())
    if not dirs:
        return []
    items = [d if str(d).startswith(("file://", "pkg://")) else f"file://{Path(d).resolve()}" for d in dirs]
    return [f"hydra.searchpath=[{','.join(items)}]"]


def config(*overrides: str, searchpath=(), **values) -> dict:
    """The run config the command line would build: conf/config.yaml, its defaults and `overrides`
    ("solver=heun", "nfe=10"), then `values` (model="gmm", nfe=10, solver={"name": ..., "order": 3} ...).
    A group given as a string picks its YAML (model="toy2d"); given as a dict, it is merged into it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from bench import CONF_DIR
    from bench.plugins import store_plugin_configs

    ovr = [*overrides, *_searchpath_override(searchpath)]
    later = {}
    for k, v in values.items():
        if k in GROUPS and isinstance(v, str):
            ovr.append(f"{k}={v}")
        elif k in GROUPS and isinstance(v, dict) and "name" in v:
            ovr.append(f"{k}={v['name']}")
            later[k] = v
        else:
            later[k] = v
    from bench.__main__ import check_group_choices
    err = check_group_choices(ovr)          # unknown model/solver/... names: the command line's message
    if err:
        raise ConfigError(err)
    store_plugin_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=ovr)
    except Exception as e:  # noqa: BLE001  (Hydra's errors name the bad override)
        raise ConfigError(f"bad configuration {ovr}: {e}") from None
    finally:
        GlobalHydra.instance().clear()
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    for k, v in later.items():
        plain[k] = _deep_merge(plain.get(k), v)
    return plain


def _deep_merge(base, over):
    """`over` merged into `base` key by key at every depth (as Hydra merges overrides); other values replace."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _deep_merge(base.get(k), v) for k, v in over.items()}}
    return over


def load_model(model: str | dict = "digits", searchpath=(), **overrides):
    """A loaded model (network, noise schedule, shape, data) by name of its YAML or by a full config dict;
    `overrides` change keys of the named YAML (e.g. schedule={"name": "vp_cosine"} or dim=8)."""
    from bench.models.registry import load_model as _load

    if isinstance(model, dict):
        return _load({**model, **overrides})
    return _load(config(searchpath=searchpath, model=model)["model"] | overrides)


@dataclass
class SampleResult:
    x0: Any               # samples, (n, *shape)
    x_T: Any              # the per-sample noise they started from
    nfe: int              # counted network evaluations per sample
    steps: int            # grid points T ... t_min (the final step to sigma_hat = 0 included)
    t: Any                # the time grid
    seconds: float        # sampling wall time
    model: Any
    solver: Any           # the SolverSpec
    knobs: dict
    cfg: dict             # the config of the run (for compute_metrics and run_cell)


def sample(model="digits", solver: str | dict = "heun", nfe: int = 18, n_samples: int = 16, seed: int = 0,
           timesteps: str | dict = "auto", dtype: str = "float32", device: str = "cpu", batch_size: int | None = None,
           searchpath=(), guidance_scale: float | None = None, labels=None, classifier_scale: float | None = None,
           classifier: str | None = None, **knobs) -> SampleResult:
    """Sample `n_samples` with `solver` (its YAML defaults, overridden by `knobs`) within an NFE budget; sample i
    starts from the noise of generator (seed, i), as in a run.  The NFE is counted, never inferred.  Conditional
    models take `guidance_scale` and `labels` as a run does (null: plain conditional, labels i mod n_classes);
    any model with a classifier takes `classifier_scale` (and `classifier`, an import path) for classifier guidance."""
    from bench.models.registry import LoadedModel
    from bench.run import DTYPES, generate, plan, resolve_device

    solver_node = {"name": solver, **knobs} if isinstance(solver, str) else {**solver, **knobs}
    if isinstance(model, LoadedModel):
        if model.cfg is None:
            raise ConfigError("bench.sample: this model was not loaded by bench.load_model; pass its name or config.")
        model = model.cfg
    cfg = config(searchpath=searchpath, model=model, solver=solver_node, timesteps=timesteps, nfe=nfe,
                 n_samples=n_samples, seed=seed, dtype=dtype, device=device, batch_size=batch_size or n_samples,
                 metrics=[], progress=False, guidance_scale=guidance_scale, labels=labels,
                 classifier_scale=classifier_scale, classifier=classifier)
    if isinstance(model, dict):
        cfg["model"] = dict(model)          # a full config replaces the YAML's, as in load_model
    spec, knobs_, _, steps, ts_name, ts_cfg, loaded, t = plan(cfg)
    dev, dt = resolve_device(device), DTYPES[dtype]
    from bench import guidance

    x_T, x0, nfes, secs = generate(loaded, spec, knobs_, t, n_samples, cfg["batch_size"], seed, dev, dt,
                                   cond=guidance.conditioning(cfg, loaded))
    spec.check_counted(max(nfes), steps, **knobs_)
    cfg["timesteps"] = {"name": ts_name, **ts_cfg}
    return SampleResult(x0, x_T, nfes[0], steps, t, secs, loaded, spec, knobs_, cfg)


def compute_metrics(result: SampleResult, metrics: Iterable[str] = ("trunc",), results_dir: str | None = None,
                    **metric_cfg) -> dict:
    """Metric columns of `result` (a `sample` output): e.g. ["trunc", "fid", "nll"]; knobs per metric as
    metric_cfg, e.g. trunc={"n_samples": 16}.  Expensive references are cached under results_dir/cache."""
    from bench.metrics import MetricContext, make_metric

    cfg = dict(result.cfg)
    if results_dir is not None:
        cfg["results_dir"] = results_dir
    mc = {k: dict(v or {}) for k, v in (cfg.get("metric_cfg") or {}).items()}
    for k, v in metric_cfg.items():
        mc[k] = {**mc.get(k, {}), **v}
    cfg["metric_cfg"], cfg["metrics"] = mc, list(metrics)
    ms = [make_metric(m, mc.get(m)) for m in metrics]
    ctx = MetricContext(cfg=cfg, model=result.model, spec=result.solver, knobs=result.knobs, t=result.t,
                        x_T=result.x_T, samples=result.x0, device=result.x0.device, dtype=result.x0.dtype,
                        batch_size=cfg["batch_size"])
    out = {}
    for m in ms:
        out.update(m.compute(ctx))
    return out


def run_cell(searchpath=(), force: bool = False, **values) -> dict:
    """Run one cell exactly as `python -m bench run` does (recorded in results_dir, skipped if already there)
    and return its row.  values: model="gmm", solver="heun" or {"name": "heun", ...}, nfe=18, metrics=[...]."""
    from bench.run import run

    return run(config(searchpath=searchpath, **values), force=force)


def run_cells(cells: Iterable[dict], searchpath=(), force: bool = False, **common):
    """Run each cell (a dict of config values, over `common`) and return a pandas DataFrame with one row per
    cell: identity columns, status, counted NFE and one column per metric."""
    import pandas as pd

    rows = []
    for cell in cells:
        row = run_cell(searchpath=searchpath, force=force, **{**common, **cell})
        flat = {k: v for k, v in row.items() if k not in ("metrics", "protocols", "config")}
        flat.update(row.get("metrics") or {})
        rows.append(flat)
    return pd.DataFrame(rows)


def load_runs(results_dir: str = "results"):
    """Every recorded row of a results store as a pandas DataFrame (metrics as columns)."""
    from bench import store

    return store.load_runs(results_dir)
