"""Issue 17: multistep updates run once per solve on Lin symbols give each step's weights, applied by combine; the
result must equal the same update formula applied to the tensors directly (float64, random history)."""
import pytest
import torch

from bench.models.schedules import VPLinear
from bench.solvers.exponential import _Grid, pp_multistep_update
from bench.solvers.lincomb import Lin, combine
from bench.solvers.sde_multistep import pp_sde_update, sa_update
from bench.solvers.unipc import unipc_coefficients, unipc_update


@pytest.fixture(scope="module")
def setup():
    t = torch.linspace(1.0, 1e-3, 9, dtype=torch.float64)
    g = _Grid(VPLinear(), t)
    gen = torch.Generator().manual_seed(0)
    x, z, *m = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(6))
    return g, x, z, m


def _same(sym, direct, vals):
    torch.testing.assert_close(combine(sym.terms((0,)), vals), direct, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_pp_multistep(setup, order):
    g, x, _, m = setup
    _same(pp_multistep_update(g, Lin(0), 4, [Lin(1), Lin(2), Lin(3)], order, "taylor"),
          pp_multistep_update(g, x, 4, m[:3], order, "taylor"), (x, *m))


@pytest.mark.parametrize("order", [2, 3])
def test_pp_sde_with_noise(setup, order):
    g, x, z, m = setup
    _same(pp_sde_update(g, Lin(0), 4, [Lin(1), Lin(2), Lin(3)], order, 1.0, "heun", "taylor", Lin(-1)),
          pp_sde_update(g, x, 4, m[:3], order, 1.0, "heun", "taylor", z), (x, *m[:3], z))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_predictor_and_corrector(setup, order):
    g, x, _, m = setup
    coef = unipc_coefficients(g, 4, order, "bh2")
    M = [Lin(j + 1) for j in range(3)]
    _same(unipc_update(g, Lin(0), 4, M, order, "bh2", coef=coef), unipc_update(g, x, 4, m[:3], order, "bh2", coef=coef),
          (x, *m[:3]))
    _same(unipc_update(g, Lin(0), 4, M, order, "bh2", m_new=Lin(-1), coef=coef),
          unipc_update(g, x, 4, m[:3], order, "bh2", m_new=m[3], coef=coef), (x, *m[:3], m[3]))


def test_sa_update(setup):
    g, x, z, m = setup
    lams = g.lam[4::-1][:3]
    _same(sa_update(g, Lin(0), 4, lams, [Lin(2), Lin(3), Lin(4)], 0.7, Lin(1)),
          sa_update(g, x, 4, lams, m[:3], 0.7, z), (x, z, *m[:3]))


def test_lin_refuses_a_product_of_tensors():
    with pytest.raises(TypeError):
        Lin(0) * Lin(1)


# ---- per-solve set-up without array calls, and its per-grid caches (issue 17, brief D)

def test_solve_small_matches_lapack_on_vandermonde_systems():
    from bench.solvers.lincomb import solve_small
    gen = torch.Generator().manual_seed(1)
    for n in (1, 2, 3, 4):
        nodes = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1.5).tolist()   # SA-Solver-like nodes
        A = [[v ** k for v in nodes] for k in range(n)]
        b = torch.randn(n, generator=gen, dtype=torch.float64)
        ref = torch.linalg.solve(torch.tensor(A, dtype=torch.float64), b)
        torch.testing.assert_close(torch.tensor(solve_small(A, b.tolist()), dtype=torch.float64), ref,
                                   rtol=1e-12, atol=1e-12)
    # a zero leading entry needs the pivot swap
    assert solve_small([[0.0, 1.0], [2.0, 0.0]], [3.0, 4.0]) == [2.0, 3.0]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_ab_coefficients_on_uniform_steps_are_the_fixed_step_adams_bashforth_weights(k):
    from bench.solvers.multistep import IPNDM_COEFFS, ab_coefficients
    s_hist = [0.5 - 0.1 * j for j in range(k)]                       # newest first, equal steps h = 0.1
    assert ab_coefficients(s_hist, 0.6) == pytest.approx(IPNDM_COEFFS[k], rel=1e-13, abs=1e-14)


class _ToyNet:
    """eps = tanh(x) (1 + t): independent of the schedule, so two schedules differ in the solvers' weights only."""

    def __call__(self, x, t):
        return torch.tanh(x) * (1 + t.reshape(-1, *([1] * (x.dim() - 1))))


@pytest.mark.parametrize("name,knobs", [("dpm_solver_pp", {"order": 3}), ("unipc", {"order": 3}), ("deis", {}),
                                        ("dpm_solver_pp_sde", {"eta": 0.0}), ("sa_solver", {"tau": 0.0})])
def test_weights_cached_per_grid_follow_the_schedule(name, knobs):
    """The per-grid weight caches (cached_weights, deis' _cached_weights) are keyed on the schedule too: the same time
    grid under another schedule gets its own weights (a solve after a cache hit for the first schedule equals a solve
    with empty caches), and a repeated solve (a cache hit) gives the same output."""
    from bench.models.dynamics import Dynamics
    from bench.solvers import deis, lincomb
    from bench.solvers.registry import get_solver
    t = torch.linspace(1.0, 1e-3, 8, dtype=torch.float64)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a, b = VPLinear(), VPLinear(beta_max=10.0)

    def solve(sch):
        return get_solver(name).fn(Dynamics(_ToyNet(), sch), x.clone(), t, None, **knobs)

    def clear():
        lincomb._WEIGHTS.clear()
        deis._cached_weights.cache_clear()

    clear()
    fresh_b = solve(b)
    clear()
    first_a = solve(a)
    again_a, then_b = solve(a), solve(b)
    assert torch.equal(again_a, first_a)
    assert torch.equal(then_b, fresh_b)
    assert float((fresh_b - first_a).abs().max()) > 1e-3          # the schedules do give other weights
