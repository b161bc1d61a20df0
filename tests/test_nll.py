import math

import pytest
import torch

from bench.metrics import make_metric
from bench.metrics.nll import bits_offset, dequantize, draw_probe, ode_logp
from bench.models.errors import ConfigError
from metric_helpers import make_ctx, tiny_image_model
from bench.models.dynamics import Dynamics
from bench.solvers.timesteps import make_timesteps


@pytest.mark.slow
def test_ode_nll_equals_analytic_on_gmm_with_exact_prior(gmm_model, tmp_path):
    ctx = make_ctx(gmm_model, torch.zeros(8, 4), tmp_path)
    for t_start in (None, 1e-5):   # default t_min = 1e-3, and score_sde's eps = 1e-5
        out = make_metric("nll", {"prior": "exact", "rtol": 1e-7, "atol": 1e-7, "n_points": 32,
                                  "t_start": t_start, "divergence": "exact"}).compute(ctx)
        assert abs(out["nll_bpd"] - out["nll_bpd_exact"]) < 0.01
        assert abs(out["nll_bpd"] - out["nll_bpd_exact"]) < (2e-3 if t_start is None else 1e-5)


def test_ode_nll_per_point_matches_log_prob(gmm_model):
    x = gmm_model.data.sample(8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([1e-5, gmm_model.schedule.T], dtype=torch.float64)
    lp, _, _ = ode_logp(Dynamics(gmm_model.net, gmm_model.schedule), x, t, rtol=1e-7, atol=1e-7,
                        prior="exact", gmm=gmm_model.data)
    per_dim_bits = (lp - gmm_model.data.log_prob(x)).abs() / (4 * math.log(2))
    assert per_dim_bits.max() < 1e-4


@pytest.mark.slow
def test_hutchinson_agrees_with_exact_divergence_within_standard_error(gmm_model):
    # 16 probes: a 4-D Rademacher probe has only 8 sign patterns up to sign, so with 8 probes the sample standard
    # error misjudges the spread about 1 % of the time
    x = gmm_model.data.sample(4, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([1e-3, gmm_model.schedule.T], dtype=torch.float64)
    dyn = lambda: Dynamics(gmm_model.net, gmm_model.schedule)  # noqa: E731
    exact, _, _ = ode_logp(dyn(), x, t, rtol=1e-5, atol=1e-5)
    for kind in ("rademacher", "gaussian"):
        est = torch.stack([ode_logp(dyn(), x, t, rtol=1e-5, atol=1e-5,
                                    probe=draw_probe(x, seed, range(4), kind))[0] for seed in range(16)])
        se = est.std(0) / math.sqrt(est.shape[0])
        assert (est.std(0) > 0).all()                          # the probe really is random
        assert ((est.mean(0) - exact).abs() < 4 * se + 1e-6).all()


def test_nll_of_rk_solver_converges_with_nfe(gmm_model, tmp_path):
    x_T = torch.zeros(4, 4)
    errs = []
    for nfe in (8, 16, 32):
        t = make_timesteps("edm", gmm_model.schedule, nfe // 2 + 1)
        ctx = make_ctx(gmm_model, x_T, tmp_path, solver="heun", t=t, knobs={"variable": "sigma_hat"})
        m = make_metric("nll", {"solver": "run", "prior": "exact", "n_points": 64})
        out = m.compute(ctx)
        assert m.protocol(ctx)["nfe"] == out["nll_nfe"] == 2 * (len(t) - 1)
        errs.append(abs(out["nll_bpd"] - out["nll_bpd_exact"]))
    assert errs[0] > 2.5 * errs[1] > 6 * errs[2]


@pytest.mark.parametrize("cells", ["score_sde", "centred"])
def test_dequantized_bits_per_dim_follow_the_cell_convention(tmp_path, cells):
    model, gauss = tiny_image_model(shape=(1, 2, 2), levels=17)
    width = {"score_sde": 2 / 17, "centred": 2 / 16}[cells]                 # cell width in model space [-1, 1]
    assert bits_offset(model, cells) == pytest.approx(-math.log2(width))   # log2(17) - 1 | log2(16) - 1
    ctx = make_ctx(model, torch.zeros(4, 1, 2, 2), tmp_path)
    m = make_metric("nll", {"prior": "schedule", "rtol": 1e-7, "atol": 1e-7, "n_points": 64, "t_start": 1e-5,
                            "cells": cells})
    out = m.compute(ctx)
    x, kind = m._points(ctx)
    proto = m.protocol(ctx)
    assert kind == "real_test_uniform_dequantized" and proto["divergence"] == "exact" and proto["cells"] == cells
    # each dequantised point stays in its level's cell: score_sde [k/17, (k+1)/17) of [0, 1], centred on k/16
    k = torch.round((model.real_data("test")[:64].double() + 1) / 2 * 16)
    left = {"score_sde": k * width - 1, "centred": k * width - 1 - width / 2}[cells]
    assert ((x >= left) & (x < left + width)).all()
    # expected: -log2 p(x)/D for the model-space density, plus -log2(cell width)
    expected = (-gauss.log_prob(x.flatten(1)) / (4 * math.log(2))).mean() - math.log2(width)
    assert out["nll_bpd"] == pytest.approx(float(expected), abs=0.01)
    assert proto["quantity"] == "discrete_nll_upper_bound" and proto["estimator"] == "monte_carlo"
    assert out["nll_what"].startswith(f"Monte-Carlo estimate (1 uniform dequantisation draw per point in {cells} cells")


def test_both_cell_conventions_use_the_same_uniform_draw():
    model, _ = tiny_image_model(shape=(1, 2, 2), levels=17)
    x = model.real_data("test")[:64]
    k = torch.round((x.double() + 1) * 8)
    u_sde = (dequantize(x, model, 0, range(64), "score_sde") + 1) / 2 * 17 - k
    u_centred = (dequantize(x, model, 0, range(64), "centred") + 1) * 8 - k + 0.5
    assert torch.allclose(u_sde, u_centred) and (u_sde >= 0).all() and (u_sde < 1).all()


def test_protocol_says_whether_the_number_is_a_density_value_an_estimate_or_a_bound(gmm_model, tmp_path):
    ctx = make_ctx(gmm_model, torch.zeros(2, 4), tmp_path)
    p = make_metric("nll", {"divergence": "exact"}).protocol(ctx)
    assert (p["quantity"], p["estimator"], p["cells"]) == ("continuous_density_nll", "ode", None)
    assert make_metric("nll", {"divergence": "hutchinson"}).protocol(ctx)["estimator"] == "monte_carlo"
    assert make_metric("nll", {"cells": "centred"}).protocol(ctx)["bits_offset"] == 0.0     # no levels on gmm
    with pytest.raises(ConfigError, match="Valid values are: score_sde, centred"):
        make_metric("nll", {"cells": "middle"})


def test_nll_is_cached_by_model_and_protocol(gmm_model, tmp_path):
    from bench.metrics import cache

    ctx = make_ctx(gmm_model, torch.zeros(8, 4), tmp_path)
    before = cache.computed["nll"]
    m = make_metric("nll", {"n_points": 8, "divergence": "exact"})
    first, second = m.compute(ctx), m.compute(ctx)
    assert first == second and cache.computed["nll"] == before + 1      # the second call is a cache hit
    make_metric("nll", {"n_points": 8, "divergence": "exact", "rtol": 1e-6}).compute(ctx)
    assert cache.computed["nll"] == before + 2                          # another protocol is another entry
