"""Solver overhead (issue 17): `python -m bench overhead [options] [model overrides]`.

For each solver, network (`null`: eps = 0, costs nothing; `model`: the configured network) and batch size, one
sampling run is timed end to end (wall) and, inside it, every network call (in-network); then
    own cost per NFE = (wall - in-network) / counted NFE     the solver's own work: coefficients, arithmetic, noise
    ratio            = wall / in-network                     1.0: the solver costs nothing beyond its network calls
    passes per NFE   = own cost per NFE / one pass            one pass: y + c k on a batch of the model's shape
Beside the solvers, each batch gets two reference rows timed in the same interleaved repeats: `(one pass)`, one
fused elementwise op over the batch (y.add(k, alpha=c): read two tensors, write one), and `(torch.randn)`, one
torch.randn of the batch.  They are the floors a solver's own cost is made of: a deterministic solver's update is
a few passes per NFE, and a stochastic one adds a draw of about one torch.randn per step.  At a large batch, where
the passes are memory traffic, "passes per NFE" says how close a solver is to its floor on any machine.
A conditional or guided run (model=digits_cond guidance_scale=3, classifier_scale=4) is timed as `bench run` builds
it: in-network is then the network's forwards (one call on twice the batch under classifier-free guidance) and the
classifier's gradients, and the guidance arithmetic around them is own cost.
Runs are interleaved (repeat r runs every solver once before repeat r+1), so a slow spell on a shared machine
touches every solver alike; the table gives medians over repeats.  Set-up (the per-sample generators, x_T, the
time grid) is done once outside the timed run; noise drawn during sampling is the solver's cost.  On CUDA the
timers synchronize the device (torch.cuda.synchronize) before they read the clock.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

DETERMINISTIC = "euler,heun,rk4,ab,unipc,dpm_solver,dpm_solver_pp,deis,ipndm_v"
STOCHASTIC = "ancestral,euler_maruyama,edm_stochastic,pc,dpm_solver_pp_sde,sa_solver"


class NullNet:
    """eps = 0 at no cost: timing a solver with it measures the solver's own work.  It takes a conditional network's
    labels too (and ignores them), so guided runs time the guidance arithmetic around it."""

    def __call__(self, x, t, cond=None):
        return torch.zeros_like(x)


class TimedNet:
    """Wraps a network and adds the wall time of each call to `seconds` (device synchronized around it)."""

    def __init__(self, net, device):
        self.net, self.seconds = net, 0.0
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, x, t, *cond):
        return self.call(self.net, x, t, *cond)

    def call(self, fn, *args):
        """fn(*args), its wall time added to `seconds`."""
        self.sync()
        t0 = time.perf_counter()
        out = fn(*args)
        self.sync()
        self.seconds += time.perf_counter() - t0
        return out

    def timed(self, fn):
        """fn with each call timed into `seconds` (a classifier guidance's gradient is network time too)."""
        return lambda *args: self.call(fn, *args)


def _case(cfg: dict, net_kind: str, device, dtype):
    """Everything a timed run needs, built once: (spec, knobs, t, x_T, rng, net, schedule, cond); cond is the run's
    Conditioning (labels, classifier-free and classifier guidance, as `bench run` builds it) or None."""
    from bench.guidance import conditioning
    from bench.run import plan
    from bench.solvers.rng import PerSampleRNG

    spec, knobs, _, _, _, _, model, t = plan(cfg)
    cond = conditioning(cfg, model)
    n = cfg["batch_size"]
    rng = PerSampleRNG(cfg["seed"], range(n), device=device, dtype=dtype)
    x_T = rng.randn(model.shape) * model.schedule.prior_std()
    net = NullNet() if net_kind == "null" else (model.net.to(device) if hasattr(model.net, "to") else model.net)
    return spec, knobs, t, x_T, rng, net, model.schedule, cond


def time_once(case, device) -> dict:
    """One sampling run: wall seconds, seconds inside the network, counted NFE."""
    from bench.models.dynamics import ClassifierGuided, Dynamics

    spec, knobs, t, x_T, rng, net, schedule, cond = case
    timed = TimedNet(net, device)
    eps = timed if cond is None else cond.wrap(timed, range(x_T.shape[0]))
    if isinstance(eps, ClassifierGuided):        # in-network: the eps network's forwards and the classifier's gradients
        eps.grad_log_potential = timed.timed(eps.grad_log_potential)
    dyn = Dynamics(eps, schedule)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        spec.fn(dyn, x_T, t, rng, **knobs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"wall": wall, "in_net": timed.seconds, "nfe": dyn.nfe}


PASS, RANDN = "(one pass)", "(torch.randn)"      # the reference rows' names
FLOOR_CALLS = 50                                 # calls per timing of a reference op (its cost is their mean)


def floor_ops(x, device) -> dict:
    """The reference ops on a batch like x: name -> a callable that times FLOOR_CALLS calls and returns one call's
    seconds (device synchronized around them)."""
    k, shape = torch.randn_like(x), tuple(x.shape)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timer(op):
        def run():
            sync()
            t0 = time.perf_counter()
            for _ in range(FLOOR_CALLS):
                op()
            sync()
            return (time.perf_counter() - t0) / FLOOR_CALLS
        return run
    return {PASS: timer(lambda: x.add(k, alpha=0.5)),
            RANDN: timer(lambda: torch.randn(shape, dtype=x.dtype, device=device))}


def measure(cfgs: dict, net_kind: str, repeat: int) -> list[dict]:
    """cfgs: solver name -> composed config (same batch); interleaved repeats; one row of medians per solver, then the
    reference rows `(one pass)` and `(torch.randn)` (floor_ops), timed in the same repeats, and each solver row's
    `passes` = own cost per NFE / one pass."""
    from bench.run import DTYPES, resolve_device

    any_cfg = next(iter(cfgs.values()))
    device, dtype = resolve_device(any_cfg["device"]), DTYPES[any_cfg["dtype"]]
    cases = {s: _case(c, net_kind, device, dtype) for s, c in cfgs.items()}
    floors = floor_ops(next(iter(cases.values()))[3], device)
    runs = {s: [] for s in cases}
    floor_runs = {f: [] for f in floors}
    with torch.inference_mode():
        for f in floors.values():
            f()
    for s, case in cases.items():                 # warm-up (first-call allocations, lazy imports)
        time_once(case, device)
    for _ in range(repeat):
        for s, case in cases.items():
            runs[s].append(time_once(case, device))
        with torch.inference_mode():
            for f, op in floors.items():
                floor_runs[f].append(op())
    one_pass = statistics.median(floor_runs[PASS])
    rows = []
    for s, rs in runs.items():
        nfe = rs[0]["nfe"]
        med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
        rows.append({"solver": s, "net": net_kind, "batch": any_cfg["batch_size"], "nfe": nfe,
                     "wall_s": med(lambda r: r["wall"]), "in_net_s": med(lambda r: r["in_net"]),
                     "own_per_nfe_s": med(lambda r: (r["wall"] - r["in_net"]) / r["nfe"]),
                     "ratio": med(lambda r: r["wall"] / r["in_net"]) if net_kind != "null" else float("nan")})
        rows[-1]["passes"] = rows[-1]["own_per_nfe_s"] / one_pass
    for f, ts in floor_runs.items():
        rows.append({"solver": f, "net": "-", "batch": any_cfg["batch_size"], "nfe": 0, "wall_s": float("nan"),
                     "in_net_s": float("nan"), "own_per_nfe_s": statistics.median(ts), "ratio": float("nan"),
                     "passes": statistics.median(ts) / one_pass})
    return rows


HEADER = (f"{'solver':<18} {'net':<6} {'batch':>5} {'NFE':>4} {'wall ms':>9} {'in-net ms':>9} {'own us/NFE':>10} "
          f"{'ratio':>7} {'passes':>7}")


def format_row(r: dict) -> str:
    """One table line; a reference row has no NFE, wall or ratio, and its `own us/NFE` column is one call's cost."""
    num = lambda v, fmt: "" if v != v else format(v, fmt)  # noqa: E731  (NaN: blank)
    return (f"{r['solver']:<18} {r['net']:<6} {r['batch']:>5} {r['nfe'] or '':>4} {num(r['wall_s'] * 1e3, '.2f'):>9} "
            f"{num(r['in_net_s'] * 1e3, '.2f'):>9} {r['own_per_nfe_s'] * 1e6:>10.1f} {num(r['ratio'], '.3f'):>7} "
            f"{num(r.get('passes', float('nan')), '.1f'):>7}")


def compose(solver: str, nfe: int, batch: int, overrides) -> dict:
    from hydra import compose as hcompose, initialize_config_dir
    from omegaconf import OmegaConf

    from bench import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        c = hcompose("config", [f"solver={solver}", f"nfe={nfe}", f"batch_size={batch}", f"n_samples={batch}",
                                "metrics=[]", *overrides])
    return OmegaConf.to_container(c, resolve=True)


def main(args=None) -> int:
    from bench.models.errors import ConfigError

    ap = argparse.ArgumentParser(prog="python -m bench overhead", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solvers", default=f"{DETERMINISTIC},{STOCHASTIC}", help="comma-separated solver names")
    ap.add_argument("--nfe", type=int, default=18, help="NFE budget of every run")
    ap.add_argument("--batch", default="16,1024", help="comma-separated batch sizes")
    ap.add_argument("--net", default="null,model", help="null (eps = 0: the solver's own cost), model, or both")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved repeats (the table gives medians)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=gmm device=cuda dtype=float64")
    a = ap.parse_args(args)
    nets = [n.strip() for n in a.net.split(",") if n.strip()]
    if bad := [n for n in nets if n not in ("null", "model")]:
        raise ConfigError(f"overhead: unknown --net {', '.join(bad)}; valid: null, model (comma-separated).")
    try:
        batches = [int(b) for b in a.batch.split(",")]
    except ValueError:
        raise ConfigError(f"overhead: --batch must be comma-separated positive integers, got {a.batch!r}") from None
    if any(b < 1 for b in batches) or a.repeat < 1 or a.nfe < 1:
        raise ConfigError("overhead: --batch, --repeat and --nfe must be positive integers.")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    solvers = [s.strip() for s in a.solvers.split(",") if s.strip()]
    print(f"# medians of {a.repeat} interleaved repeats, NFE budget {a.nfe}, threads {torch.get_num_threads()}, "
          f"overrides {' '.join(a.overrides) or '(none)'}")
    print(HEADER)
    for net in nets:
        for b in batches:
            cfgs = {s: compose(s, a.nfe, b, a.overrides) for s in solvers}
            for r in measure(cfgs, net, a.repeat):
                print(format_row(r), flush=True)
    return 0
