"""Solver overhead: `python -m bench overhead [overrides]` prints, per solver and NFE budget,
    ratio = sampling wall time / (counted NFE x wall time of one network forward on the same batch),
so 1.0 means the solver costs nothing beyond its network calls (noise set-up excluded).  Timings are medians of `--repeat` runs."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.run import DTYPES, plan, resolve_device
from bench.models.dynamics import Dynamics
from bench.solvers.rng import PerSampleRNG


def median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def forward_time(model, batch: int, device, dtype, repeat: int) -> float:
    """Median seconds of one network forward on a batch of noise at t = T/2."""
    x = torch.randn(batch, *model.shape, device=device, dtype=dtype)
    t = torch.full((batch,), model.schedule.T / 2, device=device, dtype=dtype)
    net = model.net.to(device) if hasattr(model.net, "to") else model.net

    def fwd():
        with torch.inference_mode():
            net(x, t)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return median_time(fwd, repeat)


def overhead(cfg: dict, repeat: int = 5) -> dict:
    spec, knobs, _, steps, _, _, model, t = plan(cfg)
    device, dtype = resolve_device(cfg["device"]), DTYPES[cfg["dtype"]]
    n = cfg["batch_size"]
    out = {}
    net = model.net.to(device) if hasattr(model.net, "to") else model.net
    rng = PerSampleRNG(cfg["seed"], range(n), device=device, dtype=dtype)    # built once: not solver cost
    x_T = rng.randn(model.shape) * model.schedule.prior_std()

    def sample():
        dyn = Dynamics(net, model.schedule)
        with torch.inference_mode():
            spec.fn(dyn, x_T, t, rng, **knobs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out["nfe"] = dyn.nfe
    wall = median_time(sample, repeat)
    fwd = forward_time(model, n, device, dtype, repeat * 4)
    return {"solver": spec.name, "nfe_budget": cfg["nfe"], "nfe": out["nfe"], "steps": steps, "wall_s": wall,
            "forward_s": fwd, "ratio": wall / (out["nfe"] * fwd)}


def main(args=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench overhead")
    ap.add_argument("--solvers", default="euler,heun,midpoint,ralston,rk3,rk4")
    ap.add_argument("--nfe", default="9,33")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the model, e.g. model=digits")
    a = ap.parse_args(args)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bench.app import CONF_DIR
    print(f"{'solver':<10} {'NFE':>4} {'counted':>7} {'wall ms':>9} {'fwd ms':>8} {'ratio':>7}")
    for s in a.solvers.split(","):
        for nfe in a.nfe.split(","):
            with initialize_config_dir(CONF_DIR, version_base=None):
                c = compose("config", [f"solver={s}", f"nfe={nfe}", f"batch_size={a.batch}", *a.overrides])
            r = overhead(OmegaConf.to_container(c, resolve=True), a.repeat)
            print(f"{r['solver']:<10} {r['nfe_budget']:>4} {r['nfe']:>7} {r['wall_s'] * 1e3:>9.2f} "
                  f"{r['forward_s'] * 1e3:>8.3f} {r['ratio']:>7.2f}")
    return 0
