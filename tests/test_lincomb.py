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
