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


CASES = [
    Case("euler", "euler"),
    Case("heun", "heun", budgets=(33, 65, 129, 257)),
    Case("midpoint", "midpoint", budgets=(33, 65, 129, 257)),
    Case("rk4", "rk4", budgets=(41, 81, 161, 321)),
    Case("ab order=1", "ab", {"order": 1}),
    Case("ab order=2", "ab", {"order": 2}, P2_LONG),
    Case("ab order=3", "ab", {"order": 3}, P2_LONG),
    Case("ab order=4", "ab", {"order": 4}, P2_LONG),
    Case("ab order=3 ipndm", "ab", {"order": 3, "ipndm": True}),
    Case("ab order=4 ipndm", "ab", {"order": 4, "ipndm": True}),
    Case("dpm_solver order=1", "dpm_solver", {"order": 1}),
    Case("dpm_solver order=2", "dpm_solver", {"order": 2}, (33, 65, 129, 257)),
    Case("dpm_solver order=3", "dpm_solver", {"order": 3}, (31, 61, 121, 241)),
    Case("dpm_solver fast", "dpm_solver", {"fast": True}, (30, 60, 120, 240)),
    Case("dpm_solver_pp 2M", "dpm_solver_pp", {"order": 2}, P2),
    Case("dpm_solver_pp 3M", "dpm_solver_pp", {"order": 3}, P2),
    Case("dpm_solver_pp 3M d2=dpm_solver_code", "dpm_solver_pp", {"order": 3, "d2": "dpm_solver_code"}, P2_LONG),
    Case("dpm_solver_pp 2S", "dpm_solver_pp", {"order": 2, "method": "singlestep"}, (129, 257, 513, 1025)),
    Case("unipc order=1 bh2", "unipc", {"order": 1}),
    Case("unipc order=2 bh1", "unipc", {"order": 2, "variant": "bh1"}),
    Case("unipc order=2 bh2", "unipc", {"order": 2, "variant": "bh2"}),
    Case("unipc order=3 bh2", "unipc", {"order": 3}, (256, 384, 512, 768, 1024)),
    Case("dopri5 method=midpoint", "dopri5", {"method": "midpoint"}, (129, 257, 513, 1025)),
    Case("dopri5 method=rk4", "dopri5", {"method": "rk4"}, (81, 161, 321, 641)),
]


def problem(n_samples: int = 64, seed: int = 0):
    """The gmm model, x_T (float64, per-sample RNG) and the reference x_0."""
    from bench.metrics.trunc import reference_solve
    from models.registry import load_model
    from solvers.rng import PerSampleRNG

    model = load_model({"name": "gmm", "schedule": {"name": "vp_linear"}})
    x_T = PerSampleRNG(seed, range(n_samples), dtype=torch.float64).randn(model.shape) * model.schedule.prior_std()
    ref, _ = reference_solve(model.net, model.schedule, x_T, model.schedule.T, model.schedule.t_min,
                             rtol=1e-11, atol=1e-11)
    return model, x_T, ref


def solve(model, solver, nfe, x_T, timesteps=None, rng=None, **knobs):
    """Run `solver` within an NFE budget on its default (or the given) time steps; returns (x_0, counted NFE, steps).
    The one 'budget -> grid -> counted solve' path shared by the orders command and the solver tests."""
    from models.dynamics import Dynamics
    from solvers.registry import get_solver
    from solvers.timesteps import make_timesteps

    spec = get_solver(solver)
    steps = spec.steps_for(nfe, **knobs)
    t = make_timesteps(timesteps or spec.default_timesteps, model.schedule, steps)
    dyn = Dynamics(model.net, model.schedule)
    x0 = spec.fn(dyn, x_T, t, rng, **knobs)
    return x0, dyn.nfe, steps


def measure(case: Case, model, x_T, ref):
    """(fitted order, counted NFEs, RMS errors) of one case."""
    from bench.metrics.trunc import fit_order, rms

    nfes, errs = [], []
    for b in case.budgets:
        x0, nfe, _ = solve(model, case.solver, b, x_T, case.timesteps, **case.knobs)
        nfes.append(nfe)
        errs.append(rms(x0, ref))
    return fit_order(nfes, errs)[0], nfes, errs


def theory(case: Case):
    from solvers.registry import get_solver
    return get_solver(case.solver).theoretical_order(**case.knobs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench orders", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64, help="number of x_T samples (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-sample generators (default 0)")
    ap.add_argument("--quick", action="store_true",
                    help="16 samples and the two largest budgets of each case only (a rough check in seconds)")
    ap.add_argument("--only", metavar="SOLVER", action="append",
                    help="restrict to this solver name (repeatable), e.g. --only unipc")
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error("--samples must be positive")
    cases = [c for c in CASES if not args.only or c.solver in args.only]
    if not cases:
        ap.error(f"--only matched no solver; solvers with cases: {', '.join(sorted({c.solver for c in CASES}))}")
    n = 16 if args.quick else args.samples
    torch.set_default_dtype(torch.float64)
    model, x_T, ref = problem(n, args.seed)
    print(f"gmm (vp_linear), float64, {n} samples; reference dopri5 rtol=atol=1e-11 in log sigma_hat; "
          f"order = -slope of log RMS error vs log NFE")
    head = f"{'solver':38s} {'theory':>6s} {'fitted':>7s} {'diff':>6s}  {'NFE range':>11s}  {'RMS error range':>19s}  time"
    print(head + "\n" + "-" * len(head))
    worst = 0.0
    for c in cases:
        if args.quick:
            c = Case(c.label, c.solver, c.knobs, c.budgets[-2:], c.timesteps)
        t0 = time.perf_counter()
        p, nfes, errs = measure(c, model, x_T, ref)
        th = theory(c)
        diff = p - th if th is not None else float("nan")
        worst = max(worst, abs(diff)) if th is not None else worst
        print(f"{c.label:38s} {th if th is not None else 'n/a':>6} {p:7.3f} {diff:+6.2f}  "
              f"{nfes[0]:>5d}..{nfes[-1]:<5d}  {errs[0]:9.2e}..{errs[-1]:8.2e}  {time.perf_counter() - t0:4.1f}s",
              flush=True)
    print(f"largest |fitted - theory| = {worst:.3f}")
    return 0
