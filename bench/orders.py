"""python -m bench orders: empirical global order of every deterministic solver beside its theory.

Each solver runs on the exact `gmm` model (VP-linear, float64) from the same x_T over a range of NFE
budgets in its asymptotic regime; the order is minus the least-squares slope of log RMS error against
log counted NFE, the error taken against bench.metrics.trunc.reference_solve at rtol = atol = 1e-11.
The budgets keep errors at least 100 times above the reference's own error (about 3e-11, measured
against rtol = atol = 1e-13).  The tests
(tests/test_solvers_deterministic.py) check the same cases.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch

# (label, solver, knobs, budgets): budgets chosen in each method's asymptotic range.
P2 = [64, 128, 256, 512]
P2_LONG = [128, 256, 512, 1024]


@dataclass(frozen=True)
class Case:
    label: str
    solver: str
    knobs: dict = field(default_factory=dict)
    budgets: tuple = tuple(P2)
    timesteps: str | None = None        # None: the solver's default schedule
    fn: str | None = None               # 'package.module:function' of a solver defined by its YAML (a user's sampler)
    meta: tuple = ()                    # that YAML's nfe, order, min_steps, ... as (key, value) pairs
    schedule: str = "vp_linear"         # the gmm model's noise schedule (measure() solves its own problem)
    t_min: float | None = None          # the schedule's last time, where not its default 1e-3


CASES = [
    Case("euler", "euler"),
    Case("heun", "heun", budgets=(33, 65, 129, 257)),
    Case("midpoint", "midpoint", budgets=(33, 65, 129, 257)),
    Case("rk4", "rk4", budgets=(41, 81, 161, 321)),
    Case("ab order=1", "ab", {"order": 1}),
    Case("ab order=2", "ab", {"order": 2}, P2_LONG),
    # The Runge-Kutta start-up keeps AB-k of order k in every variable; the default Euler start-up ('lower') caps it
    # at 2, reached at these budgets in t and lambda (in sigma_hat only far beyond them: see solvers/multistep.py)
    Case("ab order=3 startup=rk", "ab", {"order": 3, "startup": "rk"}, P2_LONG),
    Case("ab order=4 startup=rk", "ab", {"order": 4, "startup": "rk"}, P2_LONG),
    Case("ab order=3 startup=rk variable=t", "ab", {"order": 3, "startup": "rk", "variable": "t"}, P2_LONG),
    Case("ab order=4 startup=rk variable=t", "ab", {"order": 4, "startup": "rk", "variable": "t"}, P2_LONG),
    Case("ab order=3 startup=rk variable=lambda", "ab", {"order": 3, "startup": "rk", "variable": "lambda"}, P2_LONG),
    Case("ab order=4 startup=rk variable=lambda", "ab", {"order": 4, "startup": "rk", "variable": "lambda"}, P2_LONG),
    Case("ab order=4 variable=t", "ab", {"order": 4, "variable": "t"}, (1024, 2048, 4096)),
    Case("ab order=4 variable=lambda", "ab", {"order": 4, "variable": "lambda"}, (1024, 2048, 4096)),
    Case("ab order=3 ipndm", "ab", {"order": 3, "ipndm": True}),
    Case("ab order=4 ipndm", "ab", {"order": 4, "ipndm": True}),
    Case("dpm_solver order=1", "dpm_solver", {"order": 1}),
    Case("dpm_solver order=2", "dpm_solver", {"order": 2}, (33, 65, 129, 257)),
    Case("dpm_solver order=3", "dpm_solver", {"order": 3}, (31, 61, 121, 241)),
    Case("dpm_solver fast", "dpm_solver", {"fast": True}, (30, 60, 120, 240)),
    Case("dpm_solver_pp 2M", "dpm_solver_pp", {"order": 2}, P2),
    Case("dpm_solver_pp 3M d2=taylor", "dpm_solver_pp", {"order": 3, "d2": "taylor"}, P2),
    Case("dpm_solver_pp 3M (d2=dpm_solver_code)", "dpm_solver_pp", {"order": 3}, P2_LONG),
    Case("dpm_solver_pp 2S", "dpm_solver_pp", {"order": 2, "method": "singlestep"}, (129, 257, 513, 1025)),
    Case("unipc order=1 bh2", "unipc", {"order": 1}),
    Case("unipc order=2 bh1", "unipc", {"order": 2, "variant": "bh1"}),
    Case("unipc order=2 bh2", "unipc", {"order": 2, "variant": "bh2"}),
    # lower_order_final (default) ends with a UniP-2 step without corrector: order 3.  Its error shows only where
    # x0(lambda) still bends at t_min: invisible at the default t_min = 1e-3 up to NFE 1024 (3.92), clear at 0.2
    Case("unipc order=3 bh2 t_min=0.2", "unipc", {"order": 3}, (128, 256, 512), t_min=0.2),
    Case("unipc order=3 bh1 t_min=0.2", "unipc", {"order": 3, "variant": "bh1"}, (128, 256, 512), t_min=0.2),
    Case("unipc order=1 lower_order_final=false", "unipc", {"order": 1, "lower_order_final": False}),
    Case("unipc order=2 lower_order_final=false", "unipc", {"order": 2, "lower_order_final": False}),
    Case("unipc order=3 bh2 lower_order_final=false", "unipc", {"order": 3, "lower_order_final": False},
         (256, 384, 512, 768, 1024)),
    Case("unipc order=3 bh1 lower_order_final=false", "unipc", {"order": 3, "variant": "bh1",
                                                                 "lower_order_final": False}, (256, 384, 512, 768, 1024)),
    Case("unipc order=3 bh2 lower_order_final=false t_min=0.2", "unipc", {"order": 3, "lower_order_final": False},
         (256, 384, 512, 768, 1024), t_min=0.2),
    Case("dopri5 method=midpoint", "dopri5", {"method": "midpoint"}, (129, 257, 513, 1025)),
    Case("dopri5 method=rk4", "dopri5", {"method": "rk4"}, (81, 161, 321, 641)),
    # sub-VP SDE (Song et al. 2021): lambda spans [-5.0, 9.1] against vp_linear's [-5.0, 4.6]; heun on logsnr steps,
    # which end at t_min as the reference does (its edm default stops at sigma_hat = 0.002 > sigma_hat(t_min) = 1.1e-4)
    Case("sub_vp heun", "heun", {}, (33, 65, 129, 257), "logsnr", schedule="sub_vp"),
    Case("sub_vp dpm_solver order=2", "dpm_solver", {"order": 2}, (33, 65, 129, 257), schedule="sub_vp"),
    Case("sub_vp dpm_solver_pp 2M", "dpm_solver_pp", {"order": 2}, P2, schedule="sub_vp"),
    Case("sub_vp dpm_solver_pp 3M d2=taylor", "dpm_solver_pp", {"order": 3, "d2": "taylor"}, P2, schedule="sub_vp"),
    Case("sub_vp unipc order=2 bh2", "unipc", {"order": 2, "variant": "bh2"}, P2, schedule="sub_vp"),
    # flow matching (alpha = 1 - t, sigma = t, lambda in [-6.9, 6.9]): 2M measures 2.04 (3M d2=taylor 2.97 on P2)
    Case("flow dpm_solver_pp 2M", "dpm_solver_pp", {"order": 2}, P2, schedule="flow"),
]
# DEIS (solvers/deis.py): order r is global order r + 1 with the rhoRK start-up; the paper's DDIM start-up ('lower')
# caps it at 2, which on gmm shows at these budgets only where the first step is long (quadratic in t; on edm grids
# r = 2, 3 still measure 3.0 / 3.96 at NFE 1024).  rhoab = ab order r + 1 (tests/test_deis.py).
CASES += [
    Case("deis order=1", "deis", {"order": 1}),
    Case("deis order=2 startup=rk", "deis", {"order": 2, "startup": "rk"}, P2_LONG),
    Case("deis order=3 startup=rk", "deis", {"order": 3, "startup": "rk"}, P2_LONG),
    Case("deis order=2 method=logrho startup=rk", "deis", {"order": 2, "method": "logrho", "startup": "rk"}),
    Case("deis order=3 method=logrho startup=rk", "deis", {"order": 3, "method": "logrho", "startup": "rk"}, P2_LONG),
    Case("deis order=3 timesteps=quadratic", "deis", {"order": 3}, (512, 1024, 2048), "quadratic"),
    # ipndm_v (solvers/ipndm_v.py): order 4's weights are consistent only on geometric grids (edm: order 2); order 3
    # measures 3.0 up to NFE 1024 on edm and logsnr grids (its Euler start-up's cap of 2 lies far beyond)
    Case("ipndm_v order=1", "ipndm_v", {"order": 1}),
    Case("ipndm_v order=2", "ipndm_v", {"order": 2}, P2_LONG),
    Case("ipndm_v order=4", "ipndm_v", {"order": 4}, (1024, 2048, 4096)),
]


def problem(n_samples: int = 64, seed: int = 0, schedule: str = "vp_linear"):
    """The gmm model, x_T (float64, per-sample RNG) and the reference x_0."""
    from bench.metrics.trunc import reference_solve
    from bench.models.registry import load_model
    from bench.solvers.rng import TorchGeneratorRNG

    model = load_model({"name": "gmm", "schedule": {"name": schedule}})
    # the fixed test problem keeps the x_T it was calibrated on (per-sample torch generators, before the counter-based
    # stream): on another draw DPM-Solver-fast's fitted slope over its budgets is 2.79, not 2.99 (not yet asymptotic)
    x_T = TorchGeneratorRNG(seed, range(n_samples), dtype=torch.float64).randn(model.shape) * model.schedule.prior_std()
    ref, _ = reference_solve(model.net, model.schedule, x_T, model.schedule.T, model.schedule.t_min,
                             rtol=1e-11, atol=1e-11)
    return model, x_T, ref


def solve(model, solver, nfe, x_T, timesteps=None, rng=None, fn=None, meta=(), **knobs):
    """Run `solver` within an NFE budget on its default (or the given) time steps; returns (x_0, counted NFE, steps).
    The one 'budget -> grid -> counted solve' path shared by the orders command and the solver tests."""
    from bench.models.dynamics import Dynamics
    from bench.solvers.timesteps import make_timesteps

    spec = solver_spec(solver, knobs, fn, meta)
    steps = spec.steps_for(nfe, **knobs)
    t = make_timesteps(timesteps or spec.default_timesteps, model.schedule, steps)
    dyn = Dynamics(model.net, model.schedule)
    x0 = spec.fn(dyn, x_T, t, rng, **knobs)
    return x0, dyn.nfe, steps


def solver_spec(solver, knobs, fn=None, meta=()):
    """The spec of a built-in or plugin solver by name, or of one defined by its YAML (`fn` given)."""
    from bench.solvers.registry import solver_from_cfg

    node = {"name": solver, **knobs}
    if fn:
        node.update(fn=fn, **dict(meta))
    return solver_from_cfg(node)[0]


def user_cases(names, searchpath=()) -> list[Case]:
    """Cases for solvers without a built-in case (a user's YAML on the search path, or a plugin), with their YAML
    defaults as knobs and budgets of 16, 32, 64 and 128 steps."""
    from bench.api import config
    from bench.solvers.registry import SPEC_KEYS

    cases = []
    for name in names:
        node = config(searchpath=searchpath, solver=name)["solver"]
        knobs = {k: v for k, v in node.items() if k not in SPEC_KEYS}
        meta = tuple((k, node[k]) for k in SPEC_KEYS if k not in ("name", "fn") and node.get(k) is not None)
        spec = solver_spec(name, dict(knobs), node.get("fn"), meta)
        if spec.stochastic:
            continue
        budgets = tuple(spec.nfe_of_steps(n, **knobs) for n in (16, 32, 64, 128))
        label = name + "".join(f" {k}={v}" for k, v in knobs.items())
        cases.append(Case(label, name, knobs, budgets, fn=node.get("fn"), meta=meta))
    return cases


_OTHER_SCHEDULE: dict = {}


def on_schedule(schedule: str, model, x_T, t_min: float | None = None):
    """The problem of gmm on another noise schedule (or t_min) from the same normal draws (x_T rescaled to its prior
    std)."""
    from bench.metrics.trunc import reference_solve
    from bench.models.registry import load_model

    key = (schedule, t_min, tuple(x_T.shape), x_T.double().cpu().numpy().tobytes(), float(model.schedule.prior_std()))
    if key not in _OTHER_SCHEDULE:
        other = load_model({"name": "gmm", "schedule": {"name": schedule, **({"t_min": t_min} if t_min else {})}})
        x = x_T / model.schedule.prior_std() * other.schedule.prior_std()
        ref, _ = reference_solve(other.net, other.schedule, x, other.schedule.T, other.schedule.t_min,
                                 rtol=1e-11, atol=1e-11)
        _OTHER_SCHEDULE[key] = (other, x, ref)
    return _OTHER_SCHEDULE[key]


def measure(case: Case, model, x_T, ref):
    """(fitted order, counted NFEs, RMS errors) of one case; a case on another schedule than `model`'s runs on
    on_schedule(case.schedule, model, x_T)."""
    from bench.metrics.trunc import fit_order, rms

    if model.schedule.name != case.schedule or case.t_min is not None:
        model, x_T, ref = on_schedule(case.schedule, model, x_T, case.t_min)
    nfes, errs = [], []
    extra = {"fn": case.fn, "meta": case.meta} if case.fn else {}
    for b in case.budgets:
        x0, nfe, _ = solve(model, case.solver, b, x_T, case.timesteps, **case.knobs, **extra)
        nfes.append(nfe)
        errs.append(rms(x0, ref))
    return fit_order(nfes, errs)[0], nfes, errs


def theory(case: Case):
    return solver_spec(case.solver, dict(case.knobs), case.fn, case.meta).theoretical_order(**case.knobs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench orders", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64, help="number of x_T samples (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-sample generators (default 0)")
    ap.add_argument("--quick", action="store_true",
                    help="16 samples and the two largest budgets of each case only (a rough check in seconds)")
    ap.add_argument("--only", metavar="SOLVER", action="append",
                    help="restrict to this solver name (repeatable), e.g. --only unipc")
    ap.add_argument("--searchpath", metavar="DIR", action="append", default=[],
                    help="a config directory with solver/NAME.yaml of your own solvers (Hydra's searchpath; also "
                         "accepted as hydra.searchpath=[file://DIR])")
    argv = list(sys.argv[1:] if argv is None else argv)
    from bench.__main__ import searchpath_dirs
    sp_args = [a for a in argv if a.lstrip("+").startswith("hydra.searchpath=")]
    argv = [a for a in argv if a not in sp_args]
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error("--samples must be positive")
    searchpath = [*args.searchpath, *map(str, searchpath_dirs(sp_args))]
    from bench.models.errors import ConfigError
    known = {c.solver for c in CASES}
    try:
        cases = [c for c in CASES if not args.only or c.solver in args.only]
        cases += user_cases([s for s in dict.fromkeys(args.only or []) if s not in known], searchpath)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cases:
        ap.error(f"--only matched no deterministic solver; built-in cases: {', '.join(sorted(known))}; "
                 f"your own solvers: give their name and --searchpath DIR")
    n = 16 if args.quick else args.samples
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, x_T, ref = problem(n, args.seed)
        print(f"gmm (vp_linear), float64, {n} samples; reference dopri5 rtol=atol=1e-11 in log sigma_hat; "
              f"order = -slope of log RMS error vs log NFE")
        w = max(38, *(len(c.label) for c in cases))
        head = f"{'solver':{w}s} {'theory':>6s} {'fitted':>7s} {'diff':>6s}  {'NFE range':>11s}  {'RMS error range':>19s}  time"
        print(head + "\n" + "-" * len(head))
        worst = 0.0
        for c in cases:
            if args.quick:
                c = Case(c.label, c.solver, c.knobs, c.budgets[-2:], c.timesteps, c.fn, c.meta, c.schedule, c.t_min)
            t0 = time.perf_counter()
            p, nfes, errs = measure(c, model, x_T, ref)
            th = theory(c)
            diff = p - th if th is not None else float("nan")
            worst = max(worst, abs(diff)) if th is not None else worst
            print(f"{c.label:{w}s} {th if th is not None else 'n/a':>6} {p:7.3f} {diff:+6.2f}  "
                  f"{nfes[0]:>5d}..{nfes[-1]:<5d}  {errs[0]:9.2e}..{errs[-1]:8.2e}  {time.perf_counter() - t0:4.1f}s",
                  flush=True)
        print(f"largest |fitted - theory| = {worst:.3f}")
        return 0
    finally:
        torch.set_default_dtype(previous)   # leave the process as it was (the API and tests call main)
