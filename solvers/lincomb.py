"""Per-step weights of linear updates, computed once per solve (issue 17).

A multistep or exponential-integrator step is a linear combination of tensors (the state, past x0- or
eps-predictions, the step's noise) with coefficients that depend on the time grid only.  The update formulas are
written once, as the papers give them; run on `Lin` symbols before sampling they return each step's weights, and the
step loop applies those with fused tensor ops (`combine`: one multiply and one add per term), so no scalar work and
no temporary per coefficient remains inside the loop.
"""
from __future__ import annotations

import torch


class Lin:
    """sum_k c_k v_k over named tensors v_k with Python-float coefficients c_k; supports +, -, scalar * and /, and
    0 + Lin (Python's sum), which is all the update formulas use."""

    __slots__ = ("c",)

    def __init__(self, c):
        self.c = c if isinstance(c, dict) else {c: 1.0}

    def __add__(self, o):
        if not isinstance(o, Lin):
            if o == 0:                       # sum()'s start value
                return self
            return NotImplemented
        c = dict(self.c)
        for k, v in o.c.items():
            c[k] = c.get(k, 0.0) + v
        return Lin(c)

    __radd__ = __add__

    def __neg__(self):
        return Lin({k: -v for k, v in self.c.items()})

    def __sub__(self, o):                    # self + (-o) without the intermediate
        if not isinstance(o, Lin):
            return self + (-o)
        c = dict(self.c)
        for k, v in o.c.items():
            c[k] = c.get(k, 0.0) - v
        return Lin(c)

    def __rsub__(self, o):
        return (-self) + o

    def __mul__(self, a):
        if isinstance(a, Lin):
            return NotImplemented            # a product of two tensors is not linear
        a = float(a)
        return Lin({k: v * a for k, v in self.c.items()})

    __rmul__ = __mul__

    def __truediv__(self, a):
        a = float(a)
        return Lin({k: v / a for k, v in self.c.items()})

    def terms(self, order=None) -> list[tuple]:
        """[(name, coefficient)] without zero coefficients, names in `order` first (the state: the largest term)."""
        names = [k for k in (order or ()) if k in self.c] + [k for k in self.c if k not in (order or ())]
        return [(k, self.c[k]) for k in names if self.c[k] != 0.0]


def combine(terms, vals):
    """sum_k c_k vals[name_k] for terms [(name_k, c_k)] (Lin.terms): a new tensor, the inputs unchanged."""
    (k0, c0), rest = terms[0], terms[1:]
    v0 = vals[k0]
    if c0 != 1.0:
        out = v0.mul(c0)
    elif rest:
        (k1, c1), rest = rest[0], rest[1:]
        out = v0.add(vals[k1], alpha=c1)
    else:
        out = v0.clone()
    for k, c in rest:
        out.add_(vals[k], alpha=c)
    return out


def solve_small(A, b) -> list[float]:
    """x with A x = b for a small dense system given as lists of Python floats (Gaussian elimination with partial
    pivoting, Golub & Van Loan, Alg. 3.4.1): the per-step UniPC and SA-Solver weights of a grid without a numpy or
    torch call per step (issue 17)."""
    n = len(b)
    M = [list(map(float, row)) + [float(bi)] for row, bi in zip(A, b)]
    for k in range(n):
        p = max(range(k, n), key=lambda r: abs(M[r][k]))
        M[k], M[p] = M[p], M[k]
        piv = M[k][k]
        for r in range(k + 1, n):
            f = M[r][k] / piv
            if f != 0.0:
                Mr, Mk = M[r], M[k]
                for c in range(k, n + 1):
                    Mr[c] -= f * Mk[c]
    x = [0.0] * n
    for k in range(n - 1, -1, -1):
        x[k] = (M[k][n] - sum(M[k][c] * x[c] for c in range(k + 1, n))) / M[k][k]
    return x


_WEIGHTS: dict = {}
WEIGHTS_MAX = 64             # grids whose weights are kept (a sweep's cell solves one grid once per batch)


def cached_weights(key, build):
    """build(), memoised on key (hashable: the update function, the grid's floats and the knobs, so the weights are a
    pure function of it): the symbolic run of the update formulas is paid once per grid, not once per batch."""
    w = _WEIGHTS.get(key)
    if w is None:
        if len(_WEIGHTS) >= WEIGHTS_MAX:
            _WEIGHTS.pop(next(iter(_WEIGHTS)))
        w = _WEIGHTS[key] = build()
    return w
