"""Time-step spacings known by name (issue 15, item 2): diffusers' linspace / leading / trailing, Karras, exponential
and beta sigmas, uniform in lambda, and zero-terminal-SNR betas (Lin et al. 2024, alg. 1).  Each grid is checked
against diffusers' own EulerDiscreteScheduler arrays for the same configuration and against hand-computed values."""
import logging
import math

import pytest
import torch

from bench.models.errors import ConfigError
from bench.models.schedules import make_schedule, named_betas, rescale_zero_terminal_snr
from bench.solvers.timesteps import ENDS, TIMESTEPS, make_timesteps

NS = [2, 3, 5, 7, 10, 16, 25, 50]
BETAS = {"linear": ("linear", 1e-4, 0.02), "scaled_linear": ("scaled_linear", 0.00085, 0.012),
         "squaredcos_cap_v2": ("cosine", None, None)}


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("timesteps").setLevel(logging.ERROR)     # leading's start-below-T warning, saturation warning
    yield
    logging.getLogger("timesteps").setLevel(logging.NOTSET)


def _euler(beta_schedule, **kw):
    diffusers = pytest.importorskip("diffusers")
    _, lo, hi = BETAS[beta_schedule]
    return diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                                            **({"beta_start": lo, "beta_end": hi} if lo else {}), **kw)


_SCH = {}


def _schedule_of(beta_schedule):
    """Our vp_discrete schedule on diffusers' own float32 alphas_cumprod (betas reproducing them in float64), so the
    comparison sees the spacing, not float32 rounding of a 1000-term cumulative product."""
    if beta_schedule not in _SCH:
        acp = _euler(beta_schedule).alphas_cumprod.double()
        betas = 1 - acp / torch.cat([acp.new_ones(1), acp[:-1]])
        _SCH[beta_schedule] = make_schedule("vp_discrete", betas=betas.tolist())
    return _SCH[beta_schedule]


def _diffusers_grid(beta_schedule, n, **kw):
    d = _euler(beta_schedule, **kw)
    d.set_timesteps(n)
    return (d.timesteps.double() + 1) / 1000, d.sigmas[:-1].double()      # step k is our t = (k + 1)/N


# ------------------------------------------------------------------------------------- against diffusers' arrays
@pytest.mark.parametrize("beta_schedule", list(BETAS))
@pytest.mark.parametrize("name,knobs,dkw", [
    ("leading", {}, {"timestep_spacing": "leading"}),
    ("leading", {"steps_offset": 1}, {"timestep_spacing": "leading", "steps_offset": 1}),
    ("trailing", {}, {"timestep_spacing": "trailing"}),
    ("linspace", {}, {"timestep_spacing": "linspace"}),
])
def test_step_spacings_are_diffusers_timesteps(beta_schedule, name, knobs, dkw):
    """The same training steps as EulerDiscreteScheduler.set_timesteps (t = (k + 1)/N); at whole steps the same
    sigmas to float32 rounding.  linspace's fractional steps: diffusers interpolates sigma linearly in k, our
    schedule log alpha linearly in t (DPM-Solver's discrete wrapper), within 4e-4 relative."""
    sch = _schedule_of(beta_schedule)
    for n in NS:
        t_ref, s_ref = _diffusers_grid(beta_schedule, n, **dkw)
        t = make_timesteps(name, sch, n, **knobs)
        torch.testing.assert_close(t, t_ref, rtol=0, atol=4e-8)        # float32 fractional timesteps: 3e-8
        rtol = 4e-4 if name == "linspace" else 3e-7
        torch.testing.assert_close(sch.sigma_hat(t), s_ref, rtol=rtol, atol=0)


@pytest.mark.parametrize("beta_schedule", list(BETAS))
@pytest.mark.parametrize("name,flag", [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas"),
                                       ("beta", "use_beta_sigmas")])
def test_sigma_spacings_are_diffusers_sigmas(beta_schedule, name, flag):
    """The same noise levels as diffusers' use_*_sigmas on the model's whole range (to float32 rounding); the times
    differ by < 1.5e-4 (0.15 of a training step) because diffusers maps sigma to a step by interpolating log sigma in
    k, our schedule log alpha in t."""
    pytest.importorskip("scipy")
    sch = _schedule_of(beta_schedule)
    for n in NS:
        t_ref, s_ref = _diffusers_grid(beta_schedule, n, **{flag: True})
        t = make_timesteps(name, sch, n)
        torch.testing.assert_close(sch.sigma_hat(t), s_ref, rtol=3e-7, atol=0)
        torch.testing.assert_close(t, t_ref, rtol=0, atol=1.5e-4)


# ------------------------------------------------------------------------------------------- hand-computed values
def _ddpm():
    return make_schedule("vp_discrete", betas="linear")


def _t(ks, N=1000):
    return torch.tensor([(k + 1) / N for k in ks], dtype=torch.float64)


@pytest.mark.parametrize("name,n,knobs,steps", [
    ("leading", 10, {}, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
    ("leading", 10, {"steps_offset": 1}, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
    ("leading", 3, {}, [666, 333, 0]),                                   # floor(1000/3) = 333
    ("trailing", 10, {}, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("trailing", 16, {}, [999, 937, 874, 811, 749, 687, 624, 561, 499, 437, 374, 311, 249, 187, 124, 61]),  # x.5: even
    ("trailing", 3, {}, [999, 666, 332]),                               # round(666.67) - 1, round(333.33) - 1
    ("linspace", 4, {}, [999, 666, 333, 0]),
    ("linspace", 7, {"round": True}, [999, 832, 666, 500, 333, 166, 0]),   # 999/6 = 166.5: half to even
])
def test_step_spacings_hand_computed(name, n, knobs, steps):
    torch.testing.assert_close(make_timesteps(name, _ddpm(), n, **knobs), _t(steps), rtol=0, atol=1e-15)


def test_linspace_is_uniform_t_on_a_default_discrete_schedule():
    for n in (2, 6, 11):
        torch.testing.assert_close(make_timesteps("linspace", _ddpm(), n), make_timesteps("uniform_t", _ddpm(), n),
                                   rtol=0, atol=1e-15)


def test_step_spacings_on_a_continuous_schedule_need_num_train_steps():
    """vp_linear has no discrete steps: refused without num_train_steps; with N = 1000 step k is t = (k + 1) T/N,
    the same times as on DDPM's own N = 1000 steps."""
    sch = make_schedule("vp_linear")
    for name in ("linspace", "leading", "trailing"):
        with pytest.raises(ConfigError, match=r"continuous. Give timesteps.num_train_steps=N .*uniform_t"):
            make_timesteps(name, sch, 5)
        torch.testing.assert_close(make_timesteps(name, sch, 5, num_train_steps=1000),
                                   make_timesteps(name, _ddpm(), 5), rtol=0, atol=1e-15)


def test_karras_is_eq5_on_the_whole_range_and_edm_where_edm_does_not_cap():
    for sch in (_ddpm(), make_schedule("vp_linear"), make_schedule("ve")):
        s_max, s_min = float(sch.sigma_hat(sch.T)), float(sch.sigma_hat(sch.t_min))
        for n in (2, 5, 12):
            r = torch.linspace(0, 1, n, dtype=torch.float64)
            want = (s_max ** (1 / 7) + r * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
            t = make_timesteps("karras", sch, n)
            torch.testing.assert_close(sch.sigma_hat(t), want, rtol=1e-10, atol=0)
            torch.testing.assert_close(t, make_timesteps("edm", sch, n), rtol=1e-12, atol=0)   # no cap applies
    cos = make_schedule("vp_discrete", betas="cosine")         # sigma_hat(T) ~ 2e4: edm caps at 80, karras does not
    assert float(cos.sigma_hat(make_timesteps("karras", cos, 5)[0])) == pytest.approx(float(cos.sigma_hat(cos.T)))
    assert float(cos.sigma_hat(make_timesteps("edm", cos, 5)[0])) == pytest.approx(80.0)


@pytest.mark.parametrize("sch", [_ddpm(), make_schedule("vp_linear"), make_schedule("vp_cosine"),
                                 make_schedule("vp_discrete", betas="scaled_linear")], ids=lambda s: s.name)
def test_logsnr_and_exponential_are_exactly_uniform_in_lambda(sch):
    """logsnr (uncapped here) and exponential: lambda = -log sigma_hat steps by the same amount at every point, from
    lambda(T) to lambda(t_min)."""
    lam_T, lam_0 = float(sch.lambda_(sch.T)), float(sch.lambda_(sch.t_min))
    for name in ("logsnr", "exponential"):
        for n in (2, 7, 20):
            lam = sch.lambda_(make_timesteps(name, sch, n))
            torch.testing.assert_close(lam, torch.linspace(lam_T, lam_0, n, dtype=torch.float64), rtol=0, atol=1e-10)


def test_beta_sigmas_closed_forms():
    """Beta(1, 1) is uniform in sigma_hat; Beta(2, 1) has CDF x^2, so F^-1(p) = sqrt(p); Beta(0.6, 0.6) is symmetric:
    its middle point is the middle of the sigma_hat range."""
    sch = _ddpm()
    s_max, s_min = float(sch.sigma_hat(sch.T)), float(sch.sigma_hat(sch.t_min))
    r = torch.linspace(0, 1, 9, dtype=torch.float64)
    for knobs, q in (({"alpha": 1.0, "beta": 1.0}, 1 - r), ({"alpha": 2.0, "beta": 1.0}, torch.sqrt(1 - r))):
        torch.testing.assert_close(sch.sigma_hat(make_timesteps("beta", sch, 9, **knobs)), s_min + q * (s_max - s_min),
                                   rtol=1e-10, atol=0)
    s = sch.sigma_hat(make_timesteps("beta", sch, 9))
    assert float(s[4]) == pytest.approx((s_max + s_min) / 2, rel=1e-10)
    torch.testing.assert_close(s + s.flip(0), torch.full_like(s, s_max + s_min), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", ["karras", "exponential", "beta"])
def test_sigma_spacings_knobs_narrow_the_range_and_declared_ends_match(name):
    sch = _ddpm()
    raw = TIMESTEPS[name](sch, 7, sigma_max=50.0, sigma_min=0.05)
    first, last = ENDS[name](sch, sigma_max=50.0, sigma_min=0.05)
    assert float(raw[0]) == pytest.approx(first, rel=1e-12) and float(raw[-1]) == pytest.approx(last, rel=1e-12)
    s = sch.sigma_hat(make_timesteps(name, sch, 7, sigma_max=50.0, sigma_min=0.05))
    assert (float(s[0]), float(s[-1])) == (pytest.approx(50.0, rel=1e-10), pytest.approx(0.05, rel=1e-10))


@pytest.mark.parametrize("name,n,knobs,needle", [
    ("leading", 5, {"steps_offset": -1}, "steps_offset must be an integer >= 0"),
    ("leading", 5, {"steps_offset": 1.5}, "steps_offset must be an integer >= 0"),
    ("leading", 5, {"steps_offset": True}, "steps_offset must be an integer >= 0"),
    ("leading", 5, {"steps_offset": 900}, r"leave the training steps 0 \.\. 999"),
    ("leading", 1001, {}, "at most 1000 points"),
    ("trailing", 1500, {}, "repeat a training step"),
    ("linspace", 5, {"round": "yes"}, "round must be true"),
    ("linspace", 5, {"num_train_steps": 500}, "has its own N = 1000"),
    ("trailing", 5, {"num_train_steps": 1}, "num_train_steps must be null"),
    ("trailing", 5, {"num_train_steps": "1000"}, "num_train_steps must be null"),
    ("trailing", 5, {"spacing": 2}, "got bad parameters"),
    ("karras", 5, {"rho": 0}, "rho must be positive"),
    ("karras", 5, {"sigma_min": 10.0, "sigma_max": 1.0}, "need sigma_min < sigma_max"),
    ("exponential", 5, {"sigma_min": -1.0}, "sigma_min must be a positive number"),
    ("beta", 5, {"alpha": 0}, "alpha must be a positive number"),
    ("beta", 5, {"beta": float("nan")}, "beta must be a positive number"),
    ("beta", 5, {"beta": None}, "beta must be a positive number"),
])
def test_bad_knobs_are_config_errors(name, n, knobs, needle):
    with pytest.raises(ConfigError, match=needle):
        make_timesteps(name, _ddpm(), n, **knobs)


def test_step_spacings_refuse_points_outside_the_schedule():
    clipped = make_schedule("vp_discrete", betas="cosine", lambda_min_clipped=-5.1)      # T moved below step N-1
    with pytest.raises(ConfigError, match="beyond the model's T"):
        make_timesteps("trailing", clipped, 5)
    with pytest.raises(ConfigError, match="below the model's t_min = 0.01; set timesteps.steps_offset"):
        make_timesteps("leading", make_schedule("vp_discrete", betas="linear", t_min=0.01), 5)


def test_plan_runs_a_named_spacing_with_the_solvers_step_count():
    from bench.run import plan
    cfg = {"dtype": "float64", "n_samples": 1, "batch_size": 1, "metrics": [], "metric_cfg": {}, "nfe": 9,
           "solver": {"name": "heun", "variable": "sigma_hat"}, "timesteps": {"name": "trailing", "num_train_steps": None},
           "model": {"name": "gmm", "schedule": {"name": "vp_discrete", "betas": "linear"}}}
    _, _, _, steps, ts_name, ts_cfg, model, t = plan(cfg)
    assert (steps, ts_name) == (5, "trailing")
    torch.testing.assert_close(t, _t([999, 799, 599, 399, 199]), rtol=0, atol=1e-15)
    assert ts_cfg["sigma_hat_range"][1] == pytest.approx(float(model.schedule.sigma_hat(0.2)), rel=1e-5)


# ------------------------------------------------------------------------------------------- zero terminal SNR
@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_betas_are_lin_et_al_algorithm_1(name):
    """sqrt(alphabar) mapped affinely: first unchanged, last 0, s' = (s - s_N) s_1/(s_1 - s_N) (closed form from the
    original betas' alphabar), and diffusers' rescale_zero_terminal_snr on the same float64 betas."""
    b = named_betas(name, 1000)
    s = torch.sqrt(torch.cumprod(1 - b, 0))
    want = (s - s[-1]) * s[0] / (s[0] - s[-1])
    got = rescale_zero_terminal_snr(b)
    assert float(got[-1]) == 1.0 and float(got[0]) == pytest.approx(float(b[0]), rel=1e-10)
    torch.testing.assert_close(torch.sqrt(torch.cumprod(1 - got, 0)), want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(rescale_zero_terminal_snr(got), got, rtol=1e-12, atol=1e-15)       # idempotent
    ddim = pytest.importorskip("diffusers.schedulers.scheduling_ddim")
    torch.testing.assert_close(got, ddim.rescale_zero_terminal_snr(b.clone()), rtol=0, atol=1e-13)


def test_zero_terminal_snr_schedule_starts_at_the_last_finite_step():
    """alpha(t_N) = 0: T moves to t_{N-1} = 0.999, where alpha = s'_{N-1} (sigma_hat = 1.5e4, finite); alphabar at
    steps 0 .. N-2 is diffusers' EulerDiscreteScheduler(rescale_betas_zero_snr=True)'s (float32); a list of betas
    ending in 1 is the same schedule; trailing's first step N-1 is taken at T."""
    sch = make_schedule("vp_discrete", betas="linear", zero_terminal_snr=True)
    b = named_betas("linear", 1000)
    s = torch.sqrt(torch.cumprod(1 - b, 0))
    s_zt = (s - s[-1]) * s[0] / (s[0] - s[-1])
    assert sch.zero_terminal_snr and sch.T == 0.999 and sch.N == 1000
    assert float(sch.alpha(sch.T)) == pytest.approx(float(s_zt[-2]), rel=1e-9)
    assert float(sch.alpha(sch.t_min)) == pytest.approx(float(s[0]), rel=1e-12)
    assert float(sch.sigma_hat(sch.T)) == pytest.approx(15406.03, rel=1e-6)
    nodes = torch.arange(1, 1000, dtype=torch.float64) / 1000
    torch.testing.assert_close(sch.alpha(nodes), s_zt[:-1], rtol=1e-9, atol=1e-15)
    same = make_schedule("vp_discrete", betas=sch.betas.tolist())
    assert same.zero_terminal_snr and same.T == sch.T
    euler = _euler("linear", rescale_betas_zero_snr=True)
    torch.testing.assert_close(sch.alpha(nodes), euler.alphas_cumprod[:-1].double().sqrt(), rtol=0, atol=2e-6)
    t = make_timesteps("trailing", sch, 10)
    torch.testing.assert_close(t, torch.cat([torch.tensor([0.999], dtype=torch.float64), _t(range(899, 0, -100))]),
                               rtol=0, atol=1e-15)
    for name in ("karras", "exponential", "beta", "uniform_t", "linspace"):     # the uncapped grids start at T
        assert float(make_timesteps(name, sch, 6)[0]) == pytest.approx(0.999, rel=1e-12)
    for name in ("edm", "logsnr"):                                      # sigma_hat(T) > 800: capped at 80
        assert float(sch.sigma_hat(make_timesteps(name, sch, 6)[0])) == pytest.approx(80.0, rel=1e-9)


def test_zero_terminal_snr_bad_values():
    with pytest.raises(ConfigError, match="zero_terminal_snr must be true"):
        make_schedule("vp_discrete", betas="linear", zero_terminal_snr="yes")
    with pytest.raises(ConfigError, match="at least 3 steps"):
        make_schedule("vp_discrete", betas=[0.1, 0.2], zero_terminal_snr=True)
    assert math.isfinite(float(make_schedule("vp_discrete", betas="cosine", zero_terminal_snr=True).lambda_(0.999)))


def test_diffusers_solver_refuses_a_zero_terminal_snr_schedule():
    """solver=diffusers would hand the scheduler an extrapolated alpha at the dropped last step: refused instead."""
    from bench.solvers.diffusers_sched import _time_map

    sch = make_schedule("vp_discrete", betas="linear", num_steps=100, zero_terminal_snr=True)
    with pytest.raises(ConfigError, match="zero terminal SNR"):
        _time_map(sch, 1000)
    assert _time_map(make_schedule("vp_discrete", betas="linear", num_steps=100), 1000) == (100, 0.01)
