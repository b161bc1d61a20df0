"""Time-step schedules: the quadratic grid's closed form, explicit lists and how they meet the NFE budget."""
import pytest
import torch

from bench.run import plan
from bench.models.errors import ConfigError
from bench.models.schedules import make_schedule
from bench.solvers.timesteps import make_timesteps

SCHEDULES = [("vp_linear", {}), ("vp_cosine", {}), ("ve", {}), ("edm", {})]


@pytest.mark.parametrize("name,kw", SCHEDULES)
@pytest.mark.parametrize("n", [2, 5, 17])
def test_quadratic_is_uniform_in_sqrt_t(name, kw, n):
    sch = make_schedule(name, **kw)
    t = make_timesteps("quadratic", sch, n)
    assert t[0] == sch.T and t[-1] == sch.t_min and len(t) == n
    d = torch.diff(torch.sqrt(t))
    torch.testing.assert_close(d, torch.full_like(d, (sch.t_min ** 0.5 - sch.T ** 0.5) / (n - 1)), rtol=1e-12, atol=0)
    assert (torch.diff(t) < 0).all() and (torch.diff(t, 2) > 0).all()     # steps shrink towards the data


def test_explicit_t_list_is_taken_as_given():
    sch = make_schedule("vp_linear")
    ts = [1.0, 0.7, 0.3, 0.05, 0.001]
    t = make_timesteps("explicit", sch, 5, t=ts)
    assert t.dtype == torch.float64 and t.tolist() == ts


@pytest.mark.parametrize("name,kw", SCHEDULES)
def test_explicit_sigma_hat_list_maps_to_those_noise_levels(name, kw):
    sch = make_schedule(name, **kw)
    s_max, s_min = float(sch.sigma_hat(sch.T)), float(sch.sigma_hat(sch.t_min))
    sig = [s_max, s_max / 3, 1.0 if s_min < 1.0 < s_max / 3 else (s_max / 3 + s_min) / 2, s_min]
    t = make_timesteps("explicit", sch, 4, sigma_hat=sig)
    assert t[0] == sch.T and t[-1] == sch.t_min
    torch.testing.assert_close(sch.sigma_hat(t), torch.tensor(sig, dtype=torch.float64), rtol=1e-9, atol=0)


@pytest.mark.parametrize("knobs,needle", [
    ({"t": [1.0, 0.5, 0.5, 0.001]}, "strictly decreasing"),
    ({"t": [1.0, 0.1, 0.5, 0.001]}, "strictly decreasing"),
    ({"t": [0.9, 0.5, 0.001]}, "first t must be the start of sampling"),
    ({"t": [1.2, 0.5, 0.001]}, "first t must be the start of sampling"),
    ({"t": [1.0, 0.5, 0.0]}, r"must lie in \[0.001, 1\]"),
    ({"t": [1.0, 0.5, -0.1]}, r"must lie in \[0.001, 1\]"),
    ({"sigma_hat": [10.0, 1.0, 0.1]}, "first sigma_hat must be the start of sampling"),
    ({"t": [1.0, 0.5], "sigma_hat": [2.0, 1.0]}, "give exactly one of t"),
    ({}, "give exactly one of t"),
    ({"t": []}, "non-empty list"),
    ({"t": "1.0,0.5"}, "non-empty list"),
    ({"t": [1.0, "a"]}, "list of numbers"),
])
def test_bad_explicit_lists_are_config_errors(knobs, needle):
    sch = make_schedule("vp_linear")
    n = len(knobs.get("t") or knobs.get("sigma_hat") or [1, 2]) if not isinstance(knobs.get("t"), str) else 3
    with pytest.raises(ConfigError, match=needle):
        make_timesteps("explicit", sch, max(n, 1), **knobs)


def test_explicit_list_length_must_match_the_step_count():
    with pytest.raises(ConfigError, match="has 3 points but 4 were asked for"):
        make_timesteps("explicit", make_schedule("vp_linear"), 4, t=[1.0, 0.5, 0.001])


def _cfg(solver, nfe, **ts):
    return {"dtype": "float64", "n_samples": 1, "batch_size": 1, "solver": solver, "metrics": [], "metric_cfg": {},
            "nfe": nfe, "timesteps": {"name": "explicit", "t": None, "sigma_hat": None, **ts},
            "model": {"name": "gmm", "schedule": {"name": "vp_linear"}}}


@pytest.mark.parametrize("solver,nfe,steps", [
    ({"name": "heun", "variable": "sigma_hat"}, 9, 5),      # 2*5 - 1 = 9: exactly admitted
    ({"name": "heun", "variable": "sigma_hat"}, 50, 5),     # a larger budget is not spent: the list fixes steps
    ({"name": "euler", "variable": "sigma_hat"}, 5, 5),
    ({"name": "pc", "n_corrector": 2}, 13, 5),              # 3*(5-1) + 1
])
def test_explicit_list_fixes_steps(solver, nfe, steps):
    _, _, _, got, ts_name, _, _, t = plan(_cfg(solver, nfe, t=[1.0, 0.6, 0.3, 0.1, 0.001]))
    assert (got, ts_name, len(t)) == (steps, "explicit", steps)


@pytest.mark.parametrize("solver,nfe", [({"name": "heun", "variable": "sigma_hat"}, 8),
                                        ({"name": "pc", "n_corrector": 2}, 12)])
def test_explicit_list_over_budget_is_refused(solver, nfe):
    with pytest.raises(ConfigError, match="cannot take the 5 time points given"):
        plan(_cfg(solver, nfe, t=[1.0, 0.6, 0.3, 0.1, 0.001]))


def test_explicit_list_below_min_steps_is_refused():
    with pytest.raises(ConfigError, match="steps >= 2"):
        plan(_cfg({"name": "euler", "variable": "sigma_hat"}, 10, t=[1.0]))


def test_every_time_step_schedule_has_a_yaml_and_every_yaml_a_schedule():
    from pathlib import Path

    from omegaconf import OmegaConf

    from bench.solvers.timesteps import TIMESTEPS
    conf = Path(__file__).resolve().parents[1] / "conf" / "timesteps"
    names = {OmegaConf.load(p).name for p in conf.glob("*.yaml")} - {"auto"}
    assert names == set(TIMESTEPS), (sorted(names ^ set(TIMESTEPS)))


@pytest.mark.parametrize("name,sch_name,kw", [
    ("edm", "vp_linear", {}), ("edm", "vp_discrete", {"betas": "cosine"}), ("logsnr", "vp_discrete", {"betas": "cosine"}),
    ("edm_vp", "vp_linear", {"t_min": 1e-5}), ("edm_ve", "ve", {"sigma_max": 100.0}), ("edm_ve", "vp_cosine", {})])
def test_grid_ends_agree_with_the_declared_ends_before_pinning(name, sch_name, kw):
    """make_timesteps pins t[0] and t[-1] to the schedule's declared ends; the grid function must already put them
    there (to rounding), so pinning never hides a grid that starts or stops elsewhere."""
    from bench.solvers.timesteps import ENDS, TIMESTEPS
    sch = make_schedule(sch_name, **kw)
    raw = TIMESTEPS[name](sch, 7)
    first, last = ENDS[name](sch)
    assert float(raw[0]) == pytest.approx(first, rel=1e-12) and float(raw[-1]) == pytest.approx(last, rel=1e-12)


# ------------------------------------------------------------------ capped grids (a cosine DDPM: sigma_hat(T) ~ 4000)
def _cosine_ddpm():
    from bench.models.schedules import make_schedule
    return make_schedule("vp_discrete", betas="cosine", num_steps=200)


def test_capped_grids_start_at_sigma_max_and_keep_their_spacing():
    """edm and logsnr on a model whose sigma_hat(T) passes cap_factor * sigma_max start at sigma_max = 80 (not at T),
    edm uniform in sigma_hat^(1/rho) and logsnr uniform in lambda from there (every point, not only the pinned ends)."""
    sch = _cosine_ddpm()
    assert float(sch.sigma_hat(sch.T)) > 10 * 80
    from bench.solvers.timesteps import make_timesteps
    for name in ("edm", "logsnr"):
        t = make_timesteps(name, sch, 9, **({"rho": 7.0} if name == "edm" else {}))
        s = sch.sigma_hat(t)
        assert float(s[0]) == pytest.approx(80.0, rel=1e-9) and float(t[0]) < sch.T
        u = s ** (1 / 7) if name == "edm" else -torch.log(s)
        du = torch.diff(u)
        assert torch.allclose(du, du.mean().expand_as(du), rtol=1e-8, atol=0), (name, du)


def test_function_defaults_are_the_yaml_defaults():
    """A grid built from Python (make_timesteps with no knobs) is the grid the YAML gives."""
    import inspect
    import yaml
    from bench import CONF_DIR
    from bench.solvers.timesteps import TIMESTEPS
    for name, fn in TIMESTEPS.items():
        path = CONF_DIR / "timesteps" / f"{name}.yaml"
        conf = yaml.safe_load(path.read_text())
        for p in list(inspect.signature(fn).parameters.values())[2:]:
            if p.name in conf:
                assert conf[p.name] == p.default, (name, p.name, conf[p.name], p.default)


def test_a_long_bad_grid_is_shortened_in_the_error():
    from bench.models.errors import ConfigError
    from bench.solvers.timesteps import check_grid
    sch = _cosine_ddpm()
    t = torch.linspace(sch.T, sch.t_min, 12, dtype=torch.float64)
    t[5] = t[4]
    with pytest.raises(ConfigError, match=r"do not decrease: .*grid \[[^\]]*, \.\.\., [^\]]*\]"):
        check_grid("explicit", sch, t)
