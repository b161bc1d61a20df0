"""Explicit Runge-Kutta methods as Butcher tableaus driven by one step function (Butcher 2016, sec. 23).

The last step, from the last positive time to sigma_hat = 0, is the x0-prediction made from the
evaluation at the last positive time (EDM's Algorithm 1, line 8: Heun's last step is Euler), so a
tableau with s stages spends NFE = s * (steps - 1) + 1.
"""
from __future__ import annotations

import torch

from bench.solvers.lincomb import cached_weights
from bench.solvers.registry import register_solver
from bench.solvers.variables import ODEVariable

# name: (A (strictly lower triangular), b, c, order)
TABLEAUS = {
    "euler": ([[0.0]], [1.0], [0.0], 1),
    "heun": ([[0.0, 0.0], [1.0, 0.0]], [0.5, 0.5], [0.0, 1.0], 2),
    "midpoint": ([[0.0, 0.0], [0.5, 0.0]], [0.0, 1.0], [0.0, 0.5], 2),
    "ralston": ([[0.0, 0.0], [2 / 3, 0.0]], [0.25, 0.75], [0.0, 2 / 3], 2),
    "rk3": ([[0, 0, 0], [0.5, 0, 0], [-1.0, 2.0, 0]], [1 / 6, 2 / 3, 1 / 6], [0.0, 0.5, 1.0], 3),
    "rk4": ([[0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1.0, 0]],
            [1 / 6, 1 / 3, 1 / 3, 1 / 6], [0.0, 0.5, 0.5, 1.0], 4),
}


def rk_plan(V, tableau: str, s, dtype=None, grid=None):
    """Everything of the steps of `tableau` on the grid s (variable values) that does not depend on the state: per
    step, the stages' GridPoints at s_n + c_i h and the weights h a_ij, h b_i as Python floats, computed once per
    solve (issue 17).  grid: the GridPoints of s when the caller has them (ODEVariable.grid): stages at c = 0 and
    c = 1 are then those points, and only the others are evaluated, in one call.  (dtype is unused: scalar
    coefficients take the state's dtype in each op.)"""
    A, b, c, _ = TABLEAUS[tableau]
    s = torch.as_tensor(s, dtype=torch.float64).reshape(-1).tolist()
    h = [s1 - s0 for s0, s1 in zip(s[:-1], s[1:])]
    if grid is None:
        pts = V.points([s[n] + ci * h[n] for n in range(len(h)) for ci in c])     # (steps * stages)
    else:
        inner = iter(V.points([s[n] + ci * h[n] for n in range(len(h)) for ci in c if ci not in (0.0, 1.0)]))
        pts = [grid[n] if ci == 0.0 else grid[n + 1] if ci == 1.0 else next(inner)
               for n in range(len(h)) for ci in c]
    plan = []
    for n, hn in enumerate(h):
        a = [[(j, hn * A[i][j]) for j in range(i) if A[i][j] != 0.0] for i in range(len(b))]
        w = [(i, hn * bi) for i, bi in enumerate(b) if bi != 0.0]
        plan.append((pts[n * len(c):(n + 1) * len(c)], a, w))
    return plan


def _axpy(y, terms, k):
    """y + sum_j c_j k[j] over terms (j, c_j): fused adds with scalar coefficients, a new tensor (y is not changed)."""
    out = y
    for j, cj in terms:
        out = y.add(k[j], alpha=cj) if out is y else out.add_(k[j], alpha=cj)
    return out


def rk_apply(V, step, y, k0=None):
    """One explicit RK step (Butcher 2016, eq. 232a) from its plan (rk_plan); k0, when given, is the first stage's
    derivative at (s_n, y) already evaluated (c_1 = 0)."""
    pts, a, w = step
    k = []
    for i, p in enumerate(pts):
        if i == 0 and k0 is not None:
            k.append(k0)
            continue
        k.append(V.deriv(p, _axpy(y, a[i], k))[0])
    return _axpy(y, w, k)


def rk_step(V, tableau: str, s_n, s_next, y, k0=None):
    """One explicit RK step of `tableau` in the variable of V from s_n to s_next (Butcher 2016, eq. 232a);
    k0, when given, is the first stage's derivative at (s_n, y) already evaluated (c_1 = 0)."""
    return rk_apply(V, rk_plan(V, tableau, [float(s_n), float(s_next)])[0], y, k0)


def rk_sample(dyn, x, t, rng=None, *, tableau: str, variable: str = "sigma_hat"):
    V = ODEVariable(dyn, variable)
    s, pts, g = V.grid(t)                      # one schedule evaluation on the grid (issue 17)
    y = V.start(x, g)
    # the plan of a grid is kept (issue 17): its stage points are a schedule evaluation between the grid points
    plan = cached_weights((rk_plan, V.sch, variable, tableau, tuple(s)), lambda: rk_plan(V, tableau, s, grid=pts))
    for step in plan:
        y = rk_apply(V, step, y)
    _, eps = V.deriv(pts[-1], y)
    return V.end(y, eps, g)


def _register_rk(name: str):
    stages, order = len(TABLEAUS[name][1]), TABLEAUS[name][3]

    def fn(dyn, x, t, rng=None, variable: str = "sigma_hat"):
        return rk_sample(dyn, x, t, rng, tableau=name, variable=variable)

    fn.__name__ = f"{name}_sample"
    fn.__doc__ = f"Explicit Runge-Kutta '{name}' ({stages} stages, order {order}) on the probability-flow ODE."
    formula = "steps" if stages == 1 else f"{stages}*steps - {stages - 1}"
    c_last = TABLEAUS[name][2][-1]          # a stage at the step's end point (c = 1)?
    register_solver(name, nfe_of_steps=lambda steps, **_: stages * (steps - 1) + 1, nfe_formula=formula,
                    min_steps=2, order=order, default_timesteps="edm", end_evals=int(c_last == 1.0))(fn)


for _name in TABLEAUS:
    _register_rk(_name)
