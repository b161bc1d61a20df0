"""Solver registry: a new solver is one function registered here plus one YAML file in conf/solver/.

A solver function has the signature
    fn(dyn, x_T, t, rng, **knobs) -> x_0
with `dyn` a models.dynamics.Dynamics, `t` the decreasing positive time grid (T ... t_min; the
final step to sigma_hat = 0 is the solver's own, DESIGN 'final step'), and `rng` a PerSampleRNG for
stochastic solvers.  The spec maps an NFE budget to a step count; the benchmark counts the real NFE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from models.errors import ConfigError, unknown_name


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

    def steps_for(self, nfe: int, **knobs) -> int:
        """The most steps whose NFE fits the budget; a budget below the minimum is an error."""
        if not isinstance(nfe, int) or nfe < 1:
            raise ConfigError(f"nfe must be a positive integer, got {nfe!r}")
        need = self.nfe_of_steps(self.min_steps, **knobs)
        if nfe < need:
            raise ConfigError(f"solver '{self.name}' cannot meet an NFE budget of {nfe}: with these settings it "
                              f"needs at least {need} (NFE = {self.nfe_formula}, steps >= {self.min_steps}).")
        steps = self.min_steps
        while self.nfe_of_steps(steps + 1, **knobs) <= nfe:
            steps += 1
        return steps

    def check_steps(self, steps: int, nfe: int, **knobs) -> int:
        """A step count fixed by the user (an explicit time list) must be allowed and fit the NFE budget."""
        need = self.nfe_of_steps(max(steps, self.min_steps), **knobs)
        if steps < self.min_steps or need > nfe:
            raise ConfigError(f"solver '{self.name}' cannot take the {steps} time points given: it needs steps >= "
                              f"{self.min_steps} and NFE = {self.nfe_formula} = {need} within the budget nfe={nfe}.")
        return steps

    def theoretical_order(self, **knobs):
        return self.order(**knobs) if callable(self.order) else self.order


SOLVERS: dict[str, SolverSpec] = {}


def register_solver(name: str, **meta):
    def deco(fn):
        SOLVERS[name] = SolverSpec(name=name, fn=fn, **meta)
        return fn
    return deco


def get_solver(name: str) -> SolverSpec:
    import solvers.all  # noqa: F401  (imports every solver module, which registers itself)

    if name not in SOLVERS:
        raise unknown_name("solver", name, SOLVERS)
    return SOLVERS[name]
