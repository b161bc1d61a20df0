"""Solver registry: a solver is one function plus one YAML file.

A solver function has the signature
    fn(dyn, x_T, t, rng, **knobs) -> x_0
with `dyn` a bench.models.dynamics.Dynamics, `t` the decreasing positive time grid (T ... t_min; the
final step to sigma_hat = 0 is the solver's own, DESIGN 'final step'), and `rng` a PerSampleRNG for
stochastic solvers.  The spec maps an NFE budget to a step count; the benchmark counts the real NFE.

Three ways in, all giving the same SolverSpec:
- built-in: `@register_solver(name, nfe_of_steps=..., ...)` in a module of this package (solvers/all.py);
- a YAML anywhere on Hydra's search path naming the function: `fn: package.module:function`,
  `nfe: "2*steps - 1"`, optional `order`, `min_steps`, `stochastic`, ...; every other key is a knob;
- a plugin package: `@bench.register_solver(name, nfe="2*steps - 1", ...)` in a module named by an entry
  point of group `bench.solvers` (its knobs' defaults are the function's keyword defaults).
"""
from __future__ import annotations

import ast
import inspect
import math
from dataclasses import dataclass
from typing import Callable

from bench.models.errors import ConfigError, unknown_name

MAX_STEPS = 1_000_000        # grid points a budget may ask for (a larger nfe is an error, not a hang)

# Keys of a solver's YAML that describe the solver rather than being knobs of its function.
SPEC_KEYS = ("name", "fn", "nfe", "order", "min_steps", "stochastic", "brownian", "batch_coupled",
             "default_timesteps", "final_step")


@dataclass(frozen=True)
class SolverSpec:
    name: str
    fn: Callable
    nfe_of_steps: Callable[..., int]     # nfe_of_steps(steps, **knobs): network evaluations for that many steps
    nfe_formula: str                     # the same, for people: "2*steps - 1"
    min_steps: int = 2                   # fewest steps (grid points) the method is defined for
    order: Callable[..., float] | float | None = None   # theoretical global order (deterministic solvers)
    stochastic: bool = False
    batch_coupled: bool = False          # samples share step-size control (adaptive solvers): sample i depends on its batch within tolerance
    brownian: bool = False               # stochastic solver drawing all its noise via rng.increment (strong error defined)
    default_timesteps: str = "edm"
    final_step: str = "denoise"          # 'denoise': last step is x0-prediction at the last positive sigma
    final_step_of: Callable[..., str] | None = None   # where a knob chooses it (dpm_solver final=t_end): f(**knobs)
    source: str | None = None            # 'package.module:function' for solvers defined outside this package
    # Where a step's evaluations sit, for locating a divergence (bench.run.step_of): end_evals = how many
    # evaluations at grid time t[m] belong to step m (the step ending there: Heun's corrector, UniPC's free
    # evaluation, pc's Langevin steps) before the ones that start step m+1; an int or f(m, n, **knobs).
    # churn: the first stage of step k is evaluated above t[k-1] (EDM's churned time t_hat).
    end_evals: Callable[..., int] | int = 0
    churn: bool = False

    def final_step_at(self, **knobs) -> str:
        """The final-step convention a run with these knobs follows, for its row (DESIGN 'final step')."""
        return self.final_step_of(**knobs) if self.final_step_of is not None else self.final_step

    def end_evals_at(self, m: int, n: int, **knobs) -> int:
        return self.end_evals(m, n, **knobs) if callable(self.end_evals) else self.end_evals

    def steps_for(self, nfe: int, **knobs) -> int:
        """The most steps whose NFE fits the budget; a budget below the minimum is an error."""
        if not isinstance(nfe, int) or nfe < 1:
            raise ConfigError(f"nfe must be a positive integer, got {nfe!r}")
        need = self.nfe_of_steps(self.min_steps, **knobs)
        if nfe < need:
            raise ConfigError(f"solver '{self.name}' cannot meet an NFE budget of {nfe}: with these settings it "
                              f"needs at least {need} (NFE = {self.nfe_formula}, steps >= {self.min_steps}).")
        # the largest steps with nfe_of_steps(steps) <= nfe (NFE grows with steps): doubling, then bisection
        lo, hi = self.min_steps, self.min_steps + 1
        while self.nfe_of_steps(hi, **knobs) <= nfe:
            lo, hi = hi, 2 * hi
            if lo > MAX_STEPS:
                raise ConfigError(f"nfe={nfe} would give solver '{self.name}' more than {MAX_STEPS:,} steps "
                                  f"(NFE = {self.nfe_formula}); choose a budget below "
                                  f"{self.nfe_of_steps(MAX_STEPS, **knobs) + 1:,}.")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.nfe_of_steps(mid, **knobs) <= nfe else (lo, mid)
        return lo

    def check_steps(self, steps: int, nfe: int, **knobs) -> int:
        """A step count fixed by the user (an explicit time list) must be allowed and fit the NFE budget."""
        need = self.nfe_of_steps(max(steps, self.min_steps), **knobs)
        if steps < self.min_steps or need > nfe:
            raise ConfigError(f"solver '{self.name}' cannot take the {steps} time points given: it needs steps >= "
                              f"{self.min_steps} and NFE = {self.nfe_formula} = {need} within the budget nfe={nfe}.")
        return steps

    def check_counted(self, nfe: int, steps: int, **knobs) -> None:
        """A solver must not evaluate the network more often than its NFE formula declares for `steps`."""
        declared = self.nfe_of_steps(steps, **knobs)
        if nfe > declared:
            raise RuntimeError(f"solver '{self.name}' evaluated the network {nfe} times, more than the {declared} "
                               f"it declares for {steps} steps (NFE = {self.nfe_formula}); fix its nfe formula "
                               f"or the function")

    def theoretical_order(self, **knobs):
        return self.order(**knobs) if callable(self.order) else self.order


SOLVERS: dict[str, SolverSpec] = {}
_BUILTINS_LOADED = False


def _expr_fn(expr, what: str, solver: str, names=("steps",)):
    """A safe arithmetic expression in `steps` and the knobs ("2*steps - 1", "order*(steps - 1) + 1",
    "3*(steps - 1) if fast else steps") -> function(steps, **knobs).  Numbers pass through."""
    if isinstance(expr, bool) or expr is None:
        raise ConfigError(f"solver '{solver}': {what} must be a number or an expression in steps and the knobs, "
                          f"got {expr!r}")
    if isinstance(expr, (int, float)):
        return lambda steps=None, **_: expr
    allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Add, ast.Sub,
               ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.IfExp, ast.Compare,
               ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.BoolOp, ast.And, ast.Or, ast.Not, ast.Call)
    funcs = {"min": min, "max": max, "ceil": math.ceil, "floor": math.floor, "int": int, "abs": abs}
    try:
        tree = ast.parse(str(expr), mode="eval")
    except SyntaxError:
        tree = None
    bad = tree is None or any(not isinstance(n, allowed) for n in ast.walk(tree)) or any(
        isinstance(n, ast.Call) and not (isinstance(n.func, ast.Name) and n.func.id in funcs) for n in ast.walk(tree))
    if bad:
        raise ConfigError(f"solver '{solver}': {what} {expr!r} is not an arithmetic expression in steps and the "
                          f"knobs (+ - * / // ** %, comparisons, 'a if c else b', {', '.join(funcs)}).")
    code = compile(tree, f"<{what} of {solver}>", "eval")
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - set(funcs)

    def fn(steps=None, **knobs):
        env = {**knobs, "steps": steps}
        missing = used - set(env)
        if missing:
            raise ConfigError(f"solver '{solver}': {what} {expr!r} uses {', '.join(sorted(missing))}, which is "
                              f"neither 'steps' nor a knob of the solver ({', '.join(sorted(knobs)) or 'none'}).")
        return eval(code, {"__builtins__": {}}, {**funcs, **env})  # noqa: S307  (parsed above: arithmetic only)
    return fn


def make_spec(name: str, fn: Callable, nfe="steps", order=None, min_steps: int = 2, stochastic: bool = False,
              source: str | None = None, **meta) -> SolverSpec:
    """A SolverSpec from the public description: `nfe` an expression in steps and the knobs (or a callable),
    `order` a number, an expression in the knobs, or a callable."""
    if not callable(fn):
        raise ConfigError(f"solver '{name}': fn {source or fn!r} is not callable.")
    nfe_fn = nfe if callable(nfe) else _expr_fn(nfe, "nfe", name)
    order_fn = order
    if isinstance(order, str):                           # "order + 1": an expression in the knobs
        inner = _expr_fn(order, "order", name)
        order_fn = lambda **knobs: inner(None, **knobs)  # noqa: E731
    elif order is not None and not callable(order) and not isinstance(order, (int, float)):
        raise ConfigError(f"solver '{name}': order must be a number or an expression in the knobs, got {order!r}")
    if not isinstance(min_steps, int) or isinstance(min_steps, bool) or min_steps < 1:
        raise ConfigError(f"solver '{name}': min_steps must be a positive integer, got {min_steps!r}")
    return SolverSpec(name=name, fn=fn, nfe_of_steps=lambda steps, **knobs: int(nfe_fn(steps, **knobs)),
                      nfe_formula=str(nfe) if not callable(nfe) else "counted",
                      min_steps=min_steps, order=order_fn, stochastic=bool(stochastic), source=source, **meta)


def register_solver(name: str, nfe=None, **meta):
    """Decorator registering a solver function under `name`.

    Built-ins pass `nfe_of_steps=callable, nfe_formula=str`; plugin packages may pass `nfe="2*steps - 1"`
    (an expression in steps and the knobs), `order=`, `min_steps=`, `stochastic=`."""
    def deco(fn):
        if nfe is not None:
            SOLVERS[name] = make_spec(name, fn, nfe=nfe, source=f"{fn.__module__}:{fn.__qualname__}", **meta)
        else:
            SOLVERS[name] = SolverSpec(name=name, fn=fn, **meta)
        return fn
    return deco


def _load_builtins():
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import bench.solvers.all  # noqa: F401  (imports every solver module, which registers itself)
        from bench.plugins import load_plugins
        load_plugins()


def get_solver(name: str) -> SolverSpec:
    _load_builtins()
    if name not in SOLVERS:
        raise unknown_name("solver", name, SOLVERS)
    return SOLVERS[name]


_FROM_YAML: dict[str, SolverSpec] = {}


def solver_from_cfg(node: dict) -> tuple[SolverSpec, dict]:
    """(spec, knobs) of a solver's config node (its YAML merged with overrides).  A node with `fn` defines the
    solver itself (a user's sampler); otherwise `name` picks a registered one.  Knobs are checked against the
    function's keyword parameters: an unknown knob or a value of the wrong type is a ConfigError."""
    node = dict(node or {})
    name = node.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a solver config needs a 'name' (a string), got {name!r}")
    if node.get("fn") is not None:
        from bench.models.imports import import_object
        meta = {k: node[k] for k in SPEC_KEYS if k not in ("name", "fn") and node.get(k) is not None}
        key = repr((name, node["fn"], sorted(meta.items())))
        if key not in _FROM_YAML:
            fn = import_object(node["fn"], f"solver '{name}': fn", "my_pkg.samplers:my_sampler")
            _FROM_YAML[key] = make_spec(name, fn, source=node["fn"], **meta)
        spec = _FROM_YAML[key]
        # spec keys are not knobs, unless the function itself takes one of them (a knob named `order`)
        own = knob_defaults(spec.fn) if callable(spec.fn) else {}
        knobs = {k: v for k, v in node.items() if k not in SPEC_KEYS or (k != "name" and k != "fn" and k in own)}
    else:                                    # a registered solver: every key but name is a knob
        spec = get_solver(name)
        knobs = {k: v for k, v in node.items() if k != "name"}
    check_knobs(spec, knobs)
    return spec, knobs


def knob_defaults(fn: Callable) -> dict:
    """Keyword parameters of a solver function after (dyn, x_T, t, rng), with their defaults."""
    params = list(inspect.signature(fn).parameters.values())[4:]
    return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_knobs(spec: SolverSpec, knobs: dict) -> None:
    """Unknown knobs and knobs whose type differs from their default's are ConfigErrors listing the valid ones."""
    try:
        sig = inspect.signature(spec.fn)
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return                                           # fn(**knobs): anything goes
    valid = knob_defaults(spec.fn)
    listing = ", ".join(f"{k}={v!r}" if v is not inspect.Parameter.empty else k for k, v in valid.items()) or "none"
    for k, v in knobs.items():
        if k not in valid:
            raise ConfigError(f"solver '{spec.name}' has no knob '{k}'. Its knobs (with defaults) are: {listing}. "
                              f"Set them as solver.KNOB=VALUE.")
        d = valid[k]
        if d is inspect.Parameter.empty or d is None or v is None:
            continue
        ok = (isinstance(v, bool) if isinstance(d, bool) else
              isinstance(v, int) and not isinstance(v, bool) if isinstance(d, int) else
              isinstance(v, (int, float)) and not isinstance(v, bool) if isinstance(d, float) else
              isinstance(v, str) if isinstance(d, str) else True)
        if not ok:
            raise ConfigError(f"solver '{spec.name}': knob {k}={v!r} is of type {type(v).__name__}, but {k} takes "
                              f"type {type(d).__name__} (default {d!r}). Its knobs (with defaults) are: {listing}.")
