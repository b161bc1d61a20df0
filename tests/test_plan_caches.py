"""The per-grid caches of rk (stage plans), ipndm_v (weights), dpm_solver (step floats) and unipc (predictor-to-
predictor weights) (issue 17): a solve after a cache hit equals a solve with empty caches, the same grid under another
schedule gets its own entries, and the fused unipc/dpm_solver loops equal their per-step updates."""
import pytest
import torch

from bench.models.dynamics import Dynamics
from bench.models.schedules import VPLinear
from bench.solvers import lincomb
from bench.solvers.registry import get_solver


class _ToyNet:
    """eps = tanh(x) (1 + t): independent of the schedule, so two schedules differ in the solvers' coefficients only."""

    def __call__(self, x, t):
        return torch.tanh(x) * (1 + t.reshape(-1, *([1] * (x.dim() - 1))))


@pytest.mark.parametrize("name,knobs", [("rk4", {}), ("ipndm_v", {}), ("dpm_solver", {"order": 3}),
                                        ("dpm_solver", {"order": 2}), ("unipc", {"order": 2}),
                                        ("unipc", {"order": 3, "variant": "bh1", "lower_order_final": False})])
def test_plan_cached_per_grid_follows_the_schedule(name, knobs):
    t = torch.linspace(1.0, 1e-3, 7, dtype=torch.float64)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a, b = VPLinear(), VPLinear(beta_max=10.0)

    def solve(sch):
        return get_solver(name).fn(Dynamics(_ToyNet(), sch), x.clone(), t, None, **knobs)

    lincomb._WEIGHTS.clear()
    fresh_b = solve(b)
    lincomb._WEIGHTS.clear()
    first_a = solve(a)
    again_a, then_b = solve(a), solve(b)
    assert torch.equal(again_a, first_a)
    assert torch.equal(then_b, fresh_b)
    assert float((fresh_b - first_a).abs().max()) > 1e-3          # the schedules do give other coefficients


def test_dpm_solver_step_equals_the_paper_form():
    """dpm_solver_step (D_k folded into the eps weights) against Lu et al. 2022's Alg. 1-2 written out with the
    differences D_k, on a schedule's own alpha, sigma, lambda (float64, 1e-13)."""
    import math
    from bench.solvers.exponential import _Grid, dpm_solver_step
    sch = VPLinear()
    t = torch.tensor([0.9, 0.5], dtype=torch.float64)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    dyn = Dynamics(_ToyNet(), sch)
    g = _Grid(sch, t)

    def at(lam):
        tt = sch.t_of_lambda(torch.tensor(lam, dtype=torch.float64))
        return tt, float(sch.alpha(tt)), float(sch.sigma(tt))

    lam_s, lam_t = g.lam[0], g.lam[1]
    h = lam_t - lam_s
    _, a_s, s_s = at(lam_s)
    _, a_t, s_t = at(lam_t)
    e_s = dyn.eps(x, t[0])
    for order in (2, 3):
        got = dpm_solver_step(dyn, g, x, 0, order, e_s)
        if order == 2:
            t1, a1, s1 = at(lam_s + 0.5 * h)
            u1 = a1 / a_s * x - s1 * math.expm1(0.5 * h) * e_s
            want = a_t / a_s * x - s_t * math.expm1(h) * e_s - s_t * math.expm1(h) * (dyn.eps(u1, t1) - e_s)
        else:
            r1, r2 = 1 / 3, 2 / 3
            t1, a1, s1 = at(lam_s + r1 * h)
            t2, a2, s2 = at(lam_s + r2 * h)
            u1 = a1 / a_s * x - s1 * math.expm1(r1 * h) * e_s
            D1 = dyn.eps(u1, t1) - e_s
            u2 = a2 / a_s * x - s2 * math.expm1(r2 * h) * e_s - s2 * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1) * D1
            D2 = dyn.eps(u2, t2) - e_s
            want = a_t / a_s * x - s_t * math.expm1(h) * e_s - s_t / r2 * (math.expm1(h) / h - 1) * D2
        assert float((got - want).abs().max()) < 1e-13 * float(want.abs().max())
