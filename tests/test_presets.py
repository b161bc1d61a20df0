"""Paper-faithful configurations by name: EDM's time-step presets (Karras et al. 2022, eq. 5 / table 1), DPM-Solver's
order allocations and its t_end stop (Lu et al. 2022, sec. 3.4), the log-SNR clip of vp_discrete (DPM-Solver's
reference code), DDPM's sigma^2 = beta (Ho et al. 2020, sec. 3.2).  Each is checked against the paper's numbers,
computed here from the paper's formulas, not through the code under test."""
import math
import re

import pytest
import torch

import bench.run as brun
from bench.models.dynamics import Dynamics
from bench.models.errors import ConfigError
from bench.models.registry import load_model
from bench.models.schedules import VPDiscrete, make_schedule
from bench.solvers.exponential import paper_fast_orders
from bench.solvers.registry import get_solver
from bench.solvers.timesteps import make_timesteps

from golden_algorithms import dpm_fast_allocation


def eq5(n, s_max, s_min, rho=7.0):
    """Karras et al. 2022, eq. 5: sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    return [(s_max ** (1 / rho) + i / (n - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho for i in range(n)]


def sig_hat(sch, t):
    return sch.sigma_hat(t.double()).tolist()


# ------------------------------------------------------------------------------------ EDM presets (table 1)
@pytest.mark.parametrize("preset,sch_name,kw,s_max,s_min", [
    ("edm_vp", "vp_linear", {"t_min": 1e-5}, 80.0, 0.002),      # EDM's VP network: beta_d 19.9, beta_min 0.1, eps_t 1e-5
    ("edm_vp", "edm", {}, 80.0, 0.002),                         # EDM's own schedule, sigma = t on [0.002, 80]
    ("edm_vp", "vp_cosine", {"t_min": 1e-5}, 80.0, 0.002),      # iDDPM cosine: sigma_hat(T) = 119, capped at 80
    ("edm_vp", "vp_discrete", {"betas": "cosine", "T": 0.5, "t_min": None}, None, None),   # see below: refused
    ("edm_ve", "ve", {"sigma_max": 100.0}, 100.0, 0.02),        # VE with table 1's sigma_max = 100 (VEPrecond's range)
    ("edm_ve", "vp_linear", {}, 100.0, 0.02),
])
@pytest.mark.parametrize("n", [18, 5])                          # 18: edm_sampler's default num_steps
def test_edm_preset_is_eq5_on_the_papers_range(preset, sch_name, kw, s_max, s_min, n):
    sch = make_schedule(sch_name, **kw)
    if s_max is None:             # a start below sigma_hat = 80 (T = 0.5 of a cosine DDPM: sigma_hat(T) = 0.73)
        with pytest.raises(ConfigError, match=r"would need sigma_hat\(t_min\) <= 0.002 .* and sigma_hat\(T\) >= 80"):
            make_timesteps(preset, sch, n)
        return
    s = sig_hat(sch, make_timesteps(preset, sch, n))
    assert s[0] == pytest.approx(s_max, rel=1e-12) and s[-1] == pytest.approx(s_min, rel=1e-12)
    ref = eq5(n, s_max, s_min)
    assert s[n // 2] == pytest.approx(ref[n // 2], rel=1e-10)   # a middle value, and all the others
    assert s == pytest.approx(ref, rel=1e-10)


def test_edm_vp_on_the_edm_schedule_is_edm_samplers_grid():
    # NVlabs/edm generate.py edm_sampler (num_steps = 18, sigma_min = 0.002, sigma_max = 80, rho = 7): its t_steps
    # before the appended t_N = 0.  On the edm schedule sigma = t, so the grid is the sigmas themselves.
    t = make_timesteps("edm_vp", make_schedule("edm"), 18).tolist()
    assert t[0] == 80.0 and t[-1] == 0.002
    assert t == pytest.approx(eq5(18, 80.0, 0.002), rel=1e-14)


def test_edm_preset_starts_at_T_where_the_model_reaches_the_papers_sigma_max():
    """x_T is drawn at sigma(T): a non-VP preset grid must start at T itself, a VP one may start below T."""
    ve = make_schedule("ve", sigma_max=100.0)
    assert float(make_timesteps("edm_ve", ve, 6)[0]) == ve.T
    vp = make_schedule("vp_linear", t_min=1e-5)
    t0 = float(make_timesteps("edm_vp", vp, 6)[0])
    assert t0 < vp.T and float(vp.sigma_hat(t0)) == pytest.approx(80.0, rel=1e-12)


@pytest.mark.parametrize("preset,sch_name,kw,needles", [
    ("edm_vp", "vp_linear", {}, [r"\[0.002, 80\]", r"\[0.010486, 152.167\]", r"t_min to <= 3.98\de-05"]),
    ("edm_vp", "vp_discrete", {"betas": "cosine"},
     [r"\[0.00642541, 20291.2\]", "not possible below its first discrete step"]),
    ("edm_ve", "ve", {}, [r"\[0.02, 100\]", r"\[0.0100009, 50\]", r"sigma_hat\(T\) = 100: x_T is drawn at sigma\(T\)"]),
    ("edm_ve", "edm", {}, [r"\[0.02, 100\]", r"\[0.002, 80\]"]),
    ("edm_vp", "ve", {"sigma_max": 378.0}, [r"sigma_hat\(T\) = 80"]),     # VE starts above 80: cannot move below T
])
def test_edm_preset_outside_the_models_range_is_refused(preset, sch_name, kw, needles):
    sch = make_schedule(sch_name, **kw)
    with pytest.raises(ConfigError) as e:
        make_timesteps(preset, sch, 10)
    for nd in needles:
        assert re.search(nd, str(e.value)), (nd, str(e.value))


def test_edm_preset_takes_no_knobs():
    with pytest.raises(ConfigError, match="time-step schedule 'edm_vp' got bad parameters"):
        make_timesteps("edm_vp", make_schedule("edm"), 5, rho=3.0)


def test_edm_preset_in_a_run_records_its_name_and_range(monkeypatch):
    cfg = {"dtype": "float64", "n_samples": 1, "batch_size": 1, "nfe": 35, "metrics": [], "metric_cfg": {},
           "solver": {"name": "heun", "variable": "sigma_hat"}, "timesteps": {"name": "edm_vp"},
           "model": {"name": "gmm", "schedule": {"name": "vp_linear", "t_min": 1e-5}}}
    _, _, _, steps, ts_name, ts_cfg, _, t = brun.plan(cfg)
    assert (steps, ts_name, len(t)) == (18, "edm_vp", 18)          # EDM's 35 NFE = 18 Heun steps
    assert ts_cfg["sigma_hat_range"] == [80.0, 0.002]


# ------------------------------------------------------------------------- DPM-Solver allocations (sec. 3.4)
@pytest.mark.parametrize("N", range(1, 40))
@pytest.mark.parametrize("order", [1, 2, 3])
def test_fast_allocation_is_the_reference_codes(N, order):
    alloc = paper_fast_orders(N, order)
    assert alloc == dpm_fast_allocation(N, order) and sum(alloc) == N and set(alloc) <= {1, 2, 3}


def test_fast_allocation_papers_examples():
    assert paper_fast_orders(10) == [3, 3, 3, 1]          # NFE 10 (the audit's case)
    assert paper_fast_orders(12) == [3, 3, 3, 2, 1]
    assert paper_fast_orders(15) == [3] * 4 + [2, 1]
    assert paper_fast_orders(20) == [3] * 6 + [2]


def _vp_linear_lambda(t, b0=0.1, b1=20.0):
    """lambda = log alpha - log sigma of the linear VP SDE, closed form (Song et al. 2021, eq. 33)."""
    log_a = -0.25 * t ** 2 * (b1 - b0) - 0.5 * t * b0
    return log_a - 0.5 * math.log(-math.expm1(2 * log_a))


def _t_of_lambda(lam, lo=1e-6, hi=1.0):
    for _ in range(200):                    # lambda decreases in t: bisection, independent of the schedule's inverse
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _vp_linear_lambda(mid) > lam else (lo, mid)
    return 0.5 * (lo + hi)


def _spy_run(model, knobs, budget, timesteps="logsnr"):
    spec = get_solver("dpm_solver")
    steps = spec.steps_for(budget, **knobs)
    t = make_timesteps(timesteps, model.schedule, steps)
    times = []

    def net(x, tt):
        times.append(float(tt.reshape(-1)[0]))
        return model.net(x, tt)
    dyn = Dynamics(net, model.schedule)
    x_T = torch.randn(4, *model.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = spec.fn(dyn, x_T, t, None, **knobs)
    spec.check_counted(dyn.nfe, steps, **knobs)
    return spec, steps, t, times, dyn.nfe, out


@pytest.mark.parametrize("knobs", [{"fast_nfe": 10, "final": "t_end"}, {"orders": [3, 3, 3, 1], "final": "t_end"}])
def test_dpm_solver_fast_at_nfe_10_is_the_papers(gmm_model, knobs):
    """The paper's DPM-Solver-fast at NFE 10: 4 intervals uniform in lambda from T to t_end (the reference code's
    logSNR branch), orders [3, 3, 3, 1], 10 evaluations, no denoising at t_end."""
    spec, steps, t, times, nfe, _ = _spy_run(gmm_model, knobs, 10)
    assert (steps - 1, nfe, spec.nfe_of_steps(steps, **knobs)) == (4, 10, 10)
    lam_T, lam_0 = _vp_linear_lambda(1.0), _vp_linear_lambda(1e-3)
    lam = [lam_T + i / 4 * (lam_0 - lam_T) for i in range(5)]
    assert t.tolist() == pytest.approx([_t_of_lambda(v) for v in lam], rel=1e-9)
    # the 10 evaluations: DPM-Solver-3 at lambda_i + (0, 1/3, 2/3) h (r1 = 1/3, r2 = 2/3), DPM-Solver-1 at lambda_3
    h = (lam_0 - lam_T) / 4
    want = [lam[i] + r * h for i in range(3) for r in (0.0, 1 / 3, 2 / 3)] + [lam[3]]
    assert [_vp_linear_lambda(v) for v in times] == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_allocation_with_final_x0_costs_one_more_and_fixes_the_steps(gmm_model):
    knobs = {"fast_nfe": 10}
    with pytest.raises(ConfigError, match="cannot meet an NFE budget of 10: .* needs at least 11"):
        get_solver("dpm_solver").steps_for(10, **knobs)
    for budget in (11, 50):                        # a larger budget is not spent: the allocation fixes the steps
        _, steps, _, times, nfe, _ = _spy_run(gmm_model, knobs, budget)
        assert (steps, nfe) == (5, 11) and times[-1] == pytest.approx(1e-3, rel=1e-12)   # the denoising evaluation


def test_final_t_end_returns_x_at_t_end(gmm_model):
    """final t_end stops at t[-1]; final x0 is its x0-prediction from one more evaluation there."""
    _, _, t, _, _, x_end = _spy_run(gmm_model, {"orders": [3, 2], "final": "t_end"}, 20)
    _, _, _, _, _, x0 = _spy_run(gmm_model, {"orders": [3, 2], "final": "x0"}, 20)
    dyn = Dynamics(gmm_model.net, gmm_model.schedule)
    torch.testing.assert_close(x0, dyn.x0(x_end, t[-1]), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("N", [10, 12, 15, 20, 50])
def test_paper_nfe_equals_counted_nfe(gmm_model, N):
    """The counting table: the paper's NFE N is our counted NFE N with final t_end (dpm_solver), and N + 1 with the
    x0 at the end (the reference code's denoise_to_zero=True, which it counts as N + 1 too)."""
    for final, extra in (("t_end", 0), ("x0", 1)):
        _, steps, _, _, nfe, _ = _spy_run(gmm_model, {"fast_nfe": N, "final": final}, N + extra)
        assert nfe == N + extra and steps == len(paper_fast_orders(N)) + 1


@pytest.mark.parametrize("name,knobs", [("dpm_solver_pp", {"order": 2}), ("dpm_solver_pp", {"order": 3}),
                                        ("unipc", {"order": 2})])
@pytest.mark.parametrize("N", [10, 20])
def test_multistep_paper_nfe_n_is_budget_n_plus_1(gmm_model, name, knobs, N):
    """Multistep (the paper's N steps on N + 1 points, stopping at t_end) = our budget N + 1: N intervals, the same
    N evaluations at t[0..N-1], plus the one at t[-1] for the x0 (denoise_to_zero)."""
    spec = get_solver(name)
    assert spec.steps_for(N + 1, **knobs) - 1 == N and spec.steps_for(N, **knobs) - 1 == N - 1
    t = make_timesteps("logsnr", gmm_model.schedule, N + 1)
    times = []
    dyn = Dynamics(lambda x, tt: (times.append(float(tt.reshape(-1)[0])), gmm_model.net(x, tt))[1], gmm_model.schedule)
    spec.fn(dyn, torch.randn(2, 4, dtype=torch.float64), t, None, **knobs)
    assert dyn.nfe == N + 1 and times == pytest.approx(t.tolist(), rel=1e-12)


@pytest.mark.parametrize("knobs,budget,needle", [
    ({"orders": [3, 4, 1]}, 20, "orders must be a non-empty list of orders 1, 2 or 3"),
    ({"orders": [0, 3]}, 20, "orders must be a non-empty list"),
    ({"orders": []}, 20, "orders must be a non-empty list"),
    ({"orders": "3331"}, 20, "orders must be a non-empty list"),
    ({"orders": [3, True]}, 20, "orders must be a non-empty list"),
    ({"orders": [3, 2.0]}, 20, "orders must be a non-empty list"),
    ({"orders": [3, 3, 3, 1]}, 10, r"cannot meet an NFE budget of 10: .* needs at least 11"),
    ({"orders": [3, 3, 3, 1], "final": "t_end"}, 9, r"cannot meet an NFE budget of 9: .* needs at least 10"),
    ({"orders": [3, 1], "fast": True}, 20, "fast and orders each choose the orders"),
    ({"orders": [3, 1], "fast_nfe": 4}, 20, "orders and fast_nfe each choose the orders"),
    ({"fast_nfe": 0}, 20, "fast_nfe must be a positive integer"),
    ({"fast_nfe": 10.0}, 20, "fast_nfe must be a positive integer"),
    ({"final": "zero"}, 20, "final='zero' is not available. Valid values are: x0, t_end"),
])
def test_bad_allocation_knobs_are_config_errors_before_any_work(monkeypatch, knobs, budget, needle):
    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the knobs were checked")
    monkeypatch.setattr(brun, "load_model", no_work)
    cfg = {"dtype": "float64", "n_samples": 1, "batch_size": 1, "nfe": budget, "metrics": [], "metric_cfg": {},
           "solver": {"name": "dpm_solver", **knobs}, "timesteps": {"name": "auto"},
           "model": {"name": "gmm", "schedule": {"name": "vp_linear"}}}
    with pytest.raises(ConfigError, match=needle):
        brun.plan(cfg)


def test_allocation_on_an_explicit_grid_of_another_length_is_refused(gmm_model):
    spec = get_solver("dpm_solver")
    t = make_timesteps("explicit", gmm_model.schedule, 6, t=[1.0, 0.7, 0.4, 0.2, 0.05, 1e-3])
    with pytest.raises(ConfigError, match="cannot take the 6 time points given"):
        spec.check_steps(6, 50, orders=[3, 3, 3, 1])
    dyn = Dynamics(gmm_model.net, gmm_model.schedule)
    with pytest.raises(ConfigError, match=r"the orders \[3, 3\] need a grid of 3 points"):
        spec.fn(dyn, torch.zeros(1, 4, dtype=torch.float64), t, None, orders=[3, 3])
    assert dyn.nfe == 0


# ------------------------------------------------------------------------------------ log-SNR clip (vp_discrete)
COSINE = {"betas": "cosine", "num_steps": 1000}
CLIP = -5.1                 # DPM-Solver's reference code, NoiseScheduleVP.numerical_clip_alpha(clipped_lambda=-5.1)


def _lambda_n(betas):
    log_a = 0.5 * torch.cumsum(torch.log1p(-betas), 0)     # DDPM: abar_n = prod (1 - beta)
    return log_a - 0.5 * torch.log(-torch.expm1(2 * log_a))


def test_clip_moves_T_to_the_clip_between_the_reference_codes_steps():
    sch = make_schedule("vp_discrete", **COSINE, lambda_min_clipped=CLIP)
    assert float(sch.lambda_(sch.T)) == pytest.approx(CLIP, abs=1e-12)
    # the reference code drops the steps whose lambda < -5.1 and starts at the last kept one, t = (n_kept + 1)/N
    lam = _lambda_n(sch.betas)
    dropped = int((lam < CLIP).sum())
    assert dropped == 4 and bool((lam[-dropped:] < CLIP).all())
    n_kept = 1000 - dropped - 1
    assert (n_kept + 1) / 1000 < sch.T < (n_kept + 2) / 1000     # ours: where lambda = -5.1, inside the next step
    assert sch.describe()["lambda_min_clipped"] == CLIP and sch.describe()["T"] == sch.T


def test_clip_above_lambda_T_leaves_the_schedule_alone():
    # DDPM's linear betas end at lambda(1) = -5.06 > -5.1: nothing to clip
    sch = make_schedule("vp_discrete", betas="linear", lambda_min_clipped=CLIP)
    assert sch.T == 1.0 and float(sch.lambda_(1.0)) > CLIP


@pytest.mark.parametrize("preset,kw", [("logsnr", {"sigma_max": None}), ("logsnr", {}), ("uniform_t", {}),
                                       ("quadratic", {}), ("edm", {"cap_factor": 10.0})])
def test_x_T_and_the_grid_start_agree_under_the_clip(preset, kw):
    model = load_model({"name": "gmm", "schedule": {"name": "vp_discrete", **COSINE, "lambda_min_clipped": CLIP}})
    sch = model.schedule
    t = make_timesteps(preset, sch, 20, **kw)
    assert float(t[0]) == sch.T                                        # every grid starts at the clipped T
    assert sch.prior_std() == float(sch.sigma(t[0]))                   # where x_T is drawn (bench.run.generate)
    if preset == "logsnr":
        assert float(sch.lambda_(t[0])) == pytest.approx(CLIP, abs=1e-12)   # the first grid lambda is the clip


def test_clip_in_a_run(monkeypatch):
    cfg = {"dtype": "float64", "n_samples": 3, "batch_size": 3, "nfe": 10, "metrics": [], "metric_cfg": {},
           "seed": 0, "solver": {"name": "dpm_solver_pp"}, "timesteps": {"name": "auto"},
           "model": {"name": "gmm", "schedule": {"name": "vp_discrete", **COSINE, "lambda_min_clipped": CLIP}}}
    spec, knobs, _, steps, ts_name, ts_cfg, model, t = brun.plan(cfg)
    assert ts_name == "logsnr" and float(model.schedule.lambda_(t[0])) == pytest.approx(CLIP, abs=1e-12)
    x_T, _, _, _ = brun.generate(model, spec, knobs, t, 3, 3, 0, torch.device("cpu"), torch.float64)
    from bench.solvers.rng import PerSampleRNG      # x_T = z sigma(T) per sample: sigma at the grid's first point
    want = PerSampleRNG(0, range(3), dtype=torch.float64).randn(model.shape) * float(model.schedule.sigma(t[0]))
    torch.testing.assert_close(x_T, want, rtol=1e-15, atol=0)


def test_clip_measurement_last_4_of_1000_steps():
    """A 20-point logSNR grid from lambda(T) (DPM-Solver's, no sigma_max cap) on a cosine-beta DDPM: without the
    clip 7 of its 20 points lie in the last 4 of 1000 steps (t > 0.996), with it only the first."""
    frac = {}
    for clip in (None, CLIP):
        sch = make_schedule("vp_discrete", **COSINE, lambda_min_clipped=clip)
        t = make_timesteps("logsnr", sch, 20, sigma_max=None)
        frac[clip] = float((t > 1 - 4 / 1000).double().mean())
    assert frac == {None: 7 / 20, CLIP: 1 / 20}


@pytest.mark.parametrize("clip,needle", [
    (float("nan"), "lambda_min_clipped=nan must be a finite number"),
    (float("-inf"), "lambda_min_clipped=-inf must be a finite number"),
    ("-5.1", "must be a finite number"),
    (True, "must be a finite number"),
    (6.0, "lambda_min_clipped=6.0 leaves nothing to sample"),
])
def test_bad_clip_values_are_config_errors(clip, needle):
    with pytest.raises(ConfigError, match=needle):
        make_schedule("vp_discrete", **COSINE, lambda_min_clipped=clip)


@pytest.mark.parametrize("clip", [float("inf"), float("nan"), "x"])
def test_bad_clip_values_in_the_constructor(clip):
    with pytest.raises(ConfigError, match="lambda_min_clipped must be a finite number"):
        VPDiscrete(betas="cosine", lambda_min_clipped=clip)


def test_clip_is_not_a_knob_of_continuous_schedules():
    with pytest.raises(ConfigError, match="'vp_linear' has no parameter 'lambda_min_clipped'"):
        make_schedule("vp_linear", lambda_min_clipped=CLIP)


# ------------------------------------------------------------------------------ DDPM's sigma^2 = beta (ancestral)
def test_ancestral_beta_variance_is_ddpm_algorithm_2(gmm_model):
    """Golden step: Ho et al. 2020, Alg. 2 with sigma_t^2 = beta_t, written out in tests/golden_algorithms.py."""
    from test_golden_steps import assert_golden, run_both
    t = torch.tensor([1.0, 0.7, 0.45, 0.25, 0.1, 1e-3], dtype=torch.float64)
    x_T = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, ref, nfe, golden_nfe, log_s, log_g, declared = run_both(gmm_model, "ancestral", {"variance": "beta"}, t, x_T)
    assert log_s == log_g and nfe == golden_nfe == declared == 6
    assert_golden(out, ref, rtol=1e-12)


def test_ancestral_beta_noise_is_the_forward_steps_variance(gmm_model):
    """One step t0 -> t1 of DDPM (Ho et al. 2020, eq. 11 mean): x1 = (x0 - beta/sqrt(1 - abar_0) eps)/sqrt(1 - beta)
    + std z, beta = 1 - abar_0/abar_1; std = sqrt(beta) ('beta') or sigma_1/sigma_0 sqrt(beta) ('posterior').  x1 is
    read off as the input of the network's evaluation at t1 (the final x0-prediction's)."""
    sch = gmm_model.schedule
    t = torch.tensor([0.6, 0.3], dtype=torch.float64)
    abar0, abar1 = float(sch.alpha(t[0])) ** 2, float(sch.alpha(t[1])) ** 2
    beta = 1 - abar0 / abar1
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eps0 = gmm_model.net(x, torch.full((3,), 0.6, dtype=torch.float64))
    mean = (x - beta / math.sqrt(1 - abar0) * eps0) / math.sqrt(1 - beta)

    class Const:                    # a 'generator' whose every increment is the constant c
        def __init__(self, c):
            self.c = c

        def increment(self, xx, a, b):
            return torch.full_like(xx, self.c)

    def x1(variance, c):
        seen = []
        dyn = Dynamics(lambda xx, tt: (seen.append(xx.clone()), gmm_model.net(xx, tt))[1], sch)
        get_solver("ancestral").fn(dyn, x.clone(), t, Const(c), variance=variance)
        return seen[1]
    for variance, std in (("beta", math.sqrt(beta)), ("posterior", math.sqrt(1 - abar1) / math.sqrt(1 - abar0)
                                                                    * math.sqrt(beta))):
        torch.testing.assert_close(x1(variance, 0.0), mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x1(variance, 1.0) - x1(variance, 0.0), torch.full_like(x, std), rtol=1e-10, atol=0)


@pytest.mark.parametrize("knobs,needle", [
    ({"variance": "beta", "eta": 0.5}, "variance 'beta' .* is defined for variant 'ddpm' with eta = 1 only"),
    ({"variance": "beta", "variant": "euler"}, "variance 'beta' .* is defined for variant 'ddpm' with eta = 1 only"),
    ({"variance": "beta-tilde"}, "unknown variance 'beta-tilde'. Valid variances are: posterior, beta"),
])
def test_bad_variance_knobs_are_config_errors(gmm_model, knobs, needle):
    spec = get_solver("ancestral")
    with pytest.raises(ConfigError, match=needle):      # when the budget is planned, before the model is loaded
        spec.steps_for(20, **knobs)
    dyn = Dynamics(gmm_model.net, gmm_model.schedule)
    with pytest.raises(ConfigError, match=needle):
        spec.fn(dyn, torch.zeros(1, 4, dtype=torch.float64), torch.tensor([1.0, 1e-3], dtype=torch.float64), None,
                **knobs)
    assert dyn.nfe == 0


def test_final_step_convention_follows_the_knob():
    spec = get_solver("dpm_solver")
    assert spec.final_step_at(final="t_end") == "t_end" and spec.final_step_at(final="x0") == "denoise"
    assert spec.final_step_at() == "denoise" and get_solver("dpm_solver_pp").final_step_at(order=3) == "denoise"


@pytest.mark.slow
def test_hf_ddpm_passes_the_clip_to_its_schedule(tmp_path):
    from test_hf_ddpm import _tiny
    from bench.models.hf_ddpm import load_hf_ddpm
    root, _, _ = _tiny(tmp_path, "pipeline")       # 50 cosine betas (squaredcos_cap_v2): lambda(1) far below -5.1
    model = load_hf_ddpm({"name": "hf_ddpm", "path": str(root), "lambda_min_clipped": CLIP})
    assert float(model.schedule.lambda_(model.schedule.T)) == pytest.approx(CLIP, abs=1e-12)
