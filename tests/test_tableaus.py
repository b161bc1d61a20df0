"""Every Butcher tableau is what it claims (Butcher 2016, sec. 31, the order conditions up to order 4), every solver
claims the order its paper proves, and every
solver's printed NFE formula says what its counted NFE function computes."""
from fractions import Fraction

import pytest

import bench.solvers.all  # noqa: F401  (registers every solver)
from bench.solvers.registry import SOLVERS, _expr_fn
from bench.solvers.rk import TABLEAUS

# order conditions of explicit RK methods: (order, name, function of (A, b, c), required value)
def _dot(u, v):
    return sum(x * y for x, y in zip(u, v))


def _Av(A, v):
    return [_dot(row, v) for row in A]


CONDITIONS = [
    (1, "sum b", lambda A, b, c: sum(b), Fraction(1)),
    (2, "b.c", lambda A, b, c: _dot(b, c), Fraction(1, 2)),
    (3, "b.c^2", lambda A, b, c: _dot(b, [x * x for x in c]), Fraction(1, 3)),
    (3, "b.Ac", lambda A, b, c: _dot(b, _Av(A, c)), Fraction(1, 6)),
    (4, "b.c^3", lambda A, b, c: _dot(b, [x ** 3 for x in c]), Fraction(1, 4)),
    (4, "b.(c*Ac)", lambda A, b, c: _dot(b, [x * y for x, y in zip(c, _Av(A, c))]), Fraction(1, 8)),
    (4, "b.Ac^2", lambda A, b, c: _dot(b, _Av(A, [x * x for x in c])), Fraction(1, 12)),
    (4, "b.AAc", lambda A, b, c: _dot(b, _Av(A, _Av(A, c))), Fraction(1, 24)),
]


@pytest.mark.parametrize("name", sorted(TABLEAUS))
def test_tableau_is_explicit_consistent_and_of_its_declared_order(name):
    A, b, c, order = TABLEAUS[name]
    s = len(b)
    assert len(A) == s and all(len(row) == s for row in A) and len(c) == s
    assert all(A[i][j] == 0 for i in range(s) for j in range(i, s)), "A must be strictly lower triangular (explicit)"
    for i in range(s):
        assert sum(A[i]) == pytest.approx(c[i], abs=1e-15), f"row sum of A must equal c_{i}"
    for p, what, f, want in CONDITIONS:
        got = f(A, b, c)
        if p <= order:
            assert got == pytest.approx(float(want), abs=1e-15), (name, what)
    # the declared order is the highest: some condition of order + 1 fails (checked up to order 4)
    if order < 4:
        assert any(abs(f(A, b, c) - float(want)) > 1e-9 for p, _, f, want in CONDITIONS if p == order + 1), name
    assert SOLVERS[name].theoretical_order() == order


def _formula_solvers():
    out = []
    for name, spec in sorted(SOLVERS.items()):
        try:
            fn = _expr_fn(spec.nfe_formula, "nfe", name)
            fn(steps=4)
        except Exception:
            continue                     # prose formulas (several cases) are checked by their own solvers' tests
        out.append((name, fn))
    return out


@pytest.mark.parametrize("name,fn", _formula_solvers(), ids=[n for n, _ in _formula_solvers()])
def test_printed_nfe_formula_is_the_counted_one(name, fn):
    spec = SOLVERS[name]
    for steps in range(max(spec.min_steps, 2), 12):
        assert fn(steps=steps) == spec.nfe_of_steps(steps), (name, spec.nfe_formula, steps)


# The theory each solver claims, written out from the papers (README "Solvers" table); bench orders measures them.
DECLARED = [
    ("euler", {}, 1), ("heun", {}, 2), ("midpoint", {}, 2), ("ralston", {}, 2), ("rk3", {}, 3), ("rk4", {}, 4),
    *[("ab", {"order": k}, min(k, 2)) for k in (1, 2, 3, 4)],
    *[("ab", {"order": k, "startup": "rk", "variable": v}, k) for k in (1, 2, 3, 4) for v in ("sigma_hat", "t", "lambda")],
    *[("ab", {"order": k, "ipndm": True}, min(k, 2)) for k in (1, 2, 3, 4)],
    *[("ab", {"order": k, "ipndm": True, "startup": "rk"}, min(k, 2)) for k in (3, 4)],
    *[("dpm_solver", {"order": k}, k) for k in (1, 2, 3)], ("dpm_solver", {"fast": True}, 3),
    ("dpm_solver_pp", {"order": 1}, 1), ("dpm_solver_pp", {"order": 2}, 2), ("dpm_solver_pp", {"order": 3}, 2),
    ("dpm_solver_pp", {"order": 3, "d2": "taylor"}, 3),
    ("dpm_solver_pp", {"order": 3, "d2": "dpm_solver_code"}, 2),
    ("dpm_solver_pp", {"order": 2, "method": "singlestep"}, 2),
    *[("unipc", {"order": p, "lower_order_final": False}, p + 1) for p in (1, 2, 3)],
    *[("unipc", {"order": p, "lower_order_final": True}, min(p, 2) + 1) for p in (1, 2, 3)],
    ("unipc", {"order": 3, "variant": "bh1"}, 3),
]


@pytest.mark.parametrize("name,knobs,order", DECLARED, ids=[f"{n}-{k}" for n, k, _ in DECLARED])
def test_declared_orders_are_the_theory(name, knobs, order):
    assert SOLVERS[name].theoretical_order(**knobs) == order
