"""Golden steps: every registered solver, with each order / variant knob, against its published algorithm written
out independently in tests/golden_algorithms.py, on the exact GMM model in float64 over a short grid.

The convergence-order tests are slow and blind to a change of a coefficient that keeps the order; these cases take
milliseconds and fail when any coefficient moves by more than ~1e-12 relative.  Stochastic solvers get a stub
generator handing out the same pre-drawn normals to both sides, and the order and kind of their draws
(rng.increment over which interval, or rng.randn_like) must agree too, as must the counted NFE.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bench.models.dynamics import Dynamics
from bench.solvers.registry import SOLVERS, get_solver
from bench.solvers.timesteps import make_timesteps

from golden_algorithms import Net, StubRNG, golden

CONF = Path(__file__).resolve().parents[1] / "conf" / "solver"
RTOL = 1e-12
NO_GOLDEN = {"dopri5": "torchdiffeq's adaptive solvers, tested against torchdiffeq itself",
             "diffusers": "a wrapper around diffusers' schedulers, tested by its own module"}

GRIDS = {
    "G4": [1.0, 0.6, 0.3, 1e-3],
    "G6": [1.0, 0.7, 0.45, 0.25, 0.1, 1e-3],
    "G5edm": [1.0, 0.5, 0.2, 0.05, 1e-3],          # sigma_hat 152, 3.6, 0.72, 0.16, 0.0105: churn range [0.01, 1] hit
    "default4": 4,                                  # the solver's own default time steps with that many points
    "default6": 6,
    "default5": 5,                                  # an allocation of 4 intervals (dpm_solver orders / fast_nfe)
    "default8": 8,
}

RK = ["euler", "heun", "midpoint", "ralston", "rk3", "rk4"]
VARIABLES = ["sigma_hat", "t", "lambda"]


def _cases():
    c = []
    for name in RK:
        for v in VARIABLES:
            for g in ("G4", "default4"):
                c.append((name, {"variable": v}, g))
    for order in (1, 2, 3, 4):
        for ipndm in (False, True):
            for v in VARIABLES:
                c.append(("ab", {"order": order, "ipndm": ipndm, "variable": v}, "G6"))
            c.append(("ab", {"order": order, "ipndm": ipndm}, "default6"))
            for startup in ("rk", "lower"):
                c.append(("ab", {"order": order, "ipndm": ipndm, "startup": startup, "variable": "lambda"}, "G6"))
    for order in (1, 2, 3):
        for g in ("G4", "default4"):
            c.append(("dpm_solver", {"order": order, "fast": False}, g))
    for g in ("G4", "default4", "default6"):
        c.append(("dpm_solver", {"fast": True}, g))
    for final in ("x0", "t_end"):                   # orders fix the step count: 4 intervals on 5-point grids
        for g in ("G5edm", "default5"):
            c.append(("dpm_solver", {"orders": (3, 3, 3, 1), "final": final}, g))
            c.append(("dpm_solver", {"orders": (1, 2, 3, 2), "final": final}, g))
            c.append(("dpm_solver", {"fast_nfe": 10, "final": final}, g))            # [3, 3, 3, 1]
            c.append(("dpm_solver", {"fast_nfe": 7, "order": 2, "final": final}, g))  # [2, 2, 2, 1]
        c.append(("dpm_solver", {"order": 2, "final": "t_end"}, "G4"))
        c.append(("dpm_solver", {"fast": True, "final": "t_end"}, "default4"))
    for order in (1, 2, 3):
        for lof in (True, False):
            for d2 in (("taylor", "dpm_solver_code") if order == 3 else ("taylor",)):
                for g in ("G6", "default6"):
                    c.append(("dpm_solver_pp", {"order": order, "method": "multistep", "lower_order_final": lof,
                                                "d2": d2}, g))
    c.append(("dpm_solver_pp", {"order": 3, "method": "multistep", "lower_order_final": False, "d2": "taylor"}, "G4"))
    for order in (1, 2):
        for g in ("G4", "default4"):
            c.append(("dpm_solver_pp", {"order": order, "method": "singlestep"}, g))
    for order in (1, 2, 3):
        for variant in ("bh1", "bh2"):
            for lof in (True, False):
                for g in ("G6", "default6"):
                    c.append(("unipc", {"order": order, "variant": variant, "lower_order_final": lof}, g))
    c.append(("unipc", {"order": 3, "variant": "bh2", "lower_order_final": False}, "G4"))
    for n in ("default5", "G5edm"):   # 5 and 8 points too: "the last interval" tested beyond n = 6 (a 2-bit pattern)
        c.append(("unipc", {"order": 3, "variant": "bh1", "lower_order_final": True}, n))
        c.append(("dpm_solver_pp", {"order": 3, "method": "multistep", "lower_order_final": True, "d2": "taylor"}, n))
    c.append(("unipc", {"order": 3, "variant": "bh2", "lower_order_final": True}, "default8"))
    for g in ("G4", "default4"):
        c.append(("euler_maruyama", {}, g))
    for variant, eta in (("ddpm", 1.0), ("ddpm", 0.3), ("ddpm", 0.0), ("euler", 0.0), ("euler", 0.5), ("euler", 1.0),
                         ("euler", 2.5)):
        for g in ("G4", "default4"):
            c.append(("ancestral", {"variant": variant, "eta": eta}, g))
    for g in ("G4", "G6", "default4"):
        c.append(("ancestral", {"variant": "ddpm", "eta": 1.0, "variance": "beta"}, g))
    for knobs in ({}, {"S_churn": 1.0}, {"S_churn": 1.0, "S_noise": 1.0}, {"S_min": 0.1, "S_max": 5.0},
                  {"S_churn": 0.0}, {"S_churn": 100.0, "S_noise": 0.9}):
        for g in ("G5edm", "default6"):
            c.append(("edm_stochastic", knobs, g))
    for predictor in ("reverse_diffusion", "euler_maruyama"):
        for step_size in ("norms", "sigma2"):
            for nc in (0, 1, 2):
                c.append(("pc", {"predictor": predictor, "step_size": step_size, "n_corrector": nc}, "G4"))
            c.append(("pc", {"predictor": predictor, "step_size": step_size, "snr": 0.3}, "default4"))
    for spl, denoise in ((3, True), (3, False), (1, True), (1, False)):
        c.append(("annealed_langevin", {"steps_per_level": spl, "eps": 1e-5, "denoise": denoise}, "G4"))
    c.append(("annealed_langevin", {}, "default4"))
    return c


CASES = _cases()


def _sde_cases():
    """dpm_solver_pp_sde, sa_solver and restart (solvers/sde_multistep.py, solvers/restart.py)."""
    c = []
    for st in ("midpoint", "heun"):
        for eta in (0.0, 1.0, 2.5):
            for g in ("G4", "default6"):
                c.append(("dpm_solver_pp_sde", {"order": 2, "solver_type": st, "eta": eta}, g))
        for d2 in ("taylor", "dpm_solver_code"):
            for lof in (True, False):
                for g in ("G6", "default6"):
                    c.append(("dpm_solver_pp_sde", {"order": 3, "solver_type": st, "d2": d2, "lower_order_final": lof,
                                                    "eta": 1.0}, g))
        c.append(("dpm_solver_pp_sde", {"order": 3, "solver_type": st, "eta": 0.5}, "default8"))
        c.append(("dpm_solver_pp_sde", {"order": 3, "solver_type": st, "eta": 0.0, "lower_order_final": False}, "G6"))
    for p in (1, 2, 3, 4):
        for cor in (0, 1, 2, 3, 4):
            for o2 in ("sa_solver_code", "lagrange"):
                c.append(("sa_solver", {"predictor_order": p, "corrector_order": cor, "order2": o2}, "G6"))
        c.append(("sa_solver", {"predictor_order": p, "corrector_order": p + 1 if p < 4 else 4}, "default8"))
    for tau in (0.0, 0.5, 2.0):              # tau on every step (sigma range [0, inf]) and on part of a grid
        c.append(("sa_solver", {"tau": tau, "tau_sigma_min": 0.0, "tau_sigma_max": float("inf")}, "default6"))
        c.append(("sa_solver", {"tau": tau, "tau_sigma_min": 0.5, "tau_sigma_max": 20.0, "predictor_order": 2,
                                "corrector_order": 3}, "G4"))
    for restart, g in ((((0.06, 0.30, 2, 2),), "G5edm"), (((0.06, 0.30, 2, 2),), "default8"),
                       (((0.1, 1.0, 1, 3), (1.0, 5.0, 2, 1)), "default8"),        # two intervals at two grid points
                       (((0.7, 2.0, 1, 1), (0.75, 3.0, 1, 2)), "G5edm"),          # two intervals at one grid point
                       (((0.1, 1.0, 0, 3),), "default6"), ((), "G5edm")):         # K = 0 / none: plain Heun
        c.append(("restart", {"restart": restart}, g))
    c.append(("restart", {"restart": ((0.5, 3.0, 3, 2),), "S_noise": 1.003}, "G5edm"))
    return c


CASES += _sde_cases()

# Every value of each order/variant knob must appear in some case (so a new value needs a golden too).
REQUIRED = {
    **{name: {"variable": set(VARIABLES)} for name in RK},
    "ab": {"order": {1, 2, 3, 4}, "ipndm": {True, False}, "variable": set(VARIABLES), "startup": {"rk", "lower"}},
    "dpm_solver": {"order": {1, 2, 3}, "fast": {True, False}, "final": {"x0", "t_end"}},
    "dpm_solver_pp": {"order": {1, 2, 3}, "method": {"multistep", "singlestep"}, "lower_order_final": {True, False},
                      "d2": {"taylor", "dpm_solver_code"}},
    "unipc": {"order": {1, 2, 3}, "variant": {"bh1", "bh2"}, "lower_order_final": {True, False}},
    "ancestral": {"variant": {"ddpm", "euler"}, "variance": {"posterior", "beta"}},
    "pc": {"predictor": {"reverse_diffusion", "euler_maruyama"}, "step_size": {"norms", "sigma2"}},
    "annealed_langevin": {"denoise": {True, False}},
}
REQUIRED.update({
    "dpm_solver_pp_sde": {"order": {2, 3}, "solver_type": {"midpoint", "heun"}, "d2": {"taylor", "dpm_solver_code"},
                          "lower_order_final": {True, False}},
    "sa_solver": {"predictor_order": {1, 2, 3, 4}, "corrector_order": {0, 1, 2, 3, 4},
                  "order2": {"sa_solver_code", "lagrange"}},
})


# DEIS (solvers/deis.py) and the variable-step iPNDM (solvers/ipndm_v.py).
CASES += [("deis", {"order": r, "method": m, "startup": st}, g) for r in (1, 2, 3) for m in ("tab", "rhoab", "logrho")
          for st in ("lower", "rk") for g in ("G6", "default6")]
CASES += [("deis", {"order": 3, "method": m}, "default8") for m in ("tab", "logrho")]
CASES += [("ipndm_v", {"order": k}, g) for k in (1, 2, 3, 4) for g in ("G6", "default8")]
REQUIRED.update({"deis": {"order": {1, 2, 3}, "method": {"tab", "rhoab", "logrho"}, "startup": {"lower", "rk"}},
                 "ipndm_v": {"order": {1, 2, 3, 4}}})

def yaml_knobs(name):
    path = CONF / f"{name}.yaml"
    if not path.exists():
        return {}
    return {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "name"}


def _id(case):
    name, knobs, grid = case
    return "-".join([name, *(f"{k}={v}" for k, v in knobs.items()), grid])


def _grid(model, spec, grid):
    g = GRIDS[grid]
    if isinstance(g, int):
        return make_timesteps(spec.default_timesteps, model.schedule, g)
    return torch.tensor(g, dtype=torch.float64)


def _x_T(model, n=6):
    gen = torch.Generator().manual_seed(20240)
    return torch.randn(n, *model.shape, dtype=torch.float64, generator=gen) * model.schedule.prior_std()


def run_both(model, name, knobs, t, x_T):
    spec = get_solver(name)
    full = {**yaml_knobs(name), **knobs}
    dyn = Dynamics(model.net, model.schedule)
    rng_solver, rng_golden = StubRNG(7), StubRNG(7)
    with torch.inference_mode():
        out = spec.fn(dyn, x_T.clone(), t.clone(), rng_solver, **full)
        M = Net(model)
        ref = golden(name, M, x_T.clone(), t.clone(), rng_golden, **full)
    return out, ref, dyn.nfe, M.calls, rng_solver.log, rng_golden.log, spec.nfe_of_steps(len(t), **full)


def assert_golden(out, ref, rtol=RTOL):
    assert out.shape == ref.shape and out.dtype == torch.float64
    err, scale = float((out - ref).abs().max()), float(ref.abs().max())
    assert torch.isfinite(ref).all() and scale > 0
    assert err <= rtol * scale, f"max |solver - golden| = {err:.3e}, {err / scale:.3e} of max |golden| = {scale:.3e}"


@pytest.mark.parametrize("name,knobs,grid", CASES, ids=[_id(c) for c in CASES])
def test_golden_step(gmm_model, name, knobs, grid):
    spec = get_solver(name)
    t = _grid(gmm_model, spec, grid)
    out, ref, nfe, golden_nfe, log_s, log_g, declared = run_both(gmm_model, name, knobs, t, _x_T(gmm_model))
    assert log_s == log_g, "the solver draws its noise in another order or through another method than the paper"
    assert nfe == golden_nfe == declared, (nfe, golden_nfe, declared)
    assert_golden(out, ref)


def test_every_registered_solver_has_a_golden_case():
    import bench.solvers.all  # noqa: F401
    covered = {name for name, _, _ in CASES}
    missing = sorted(set(SOLVERS) - set(NO_GOLDEN) - covered)
    assert not missing, f"solvers without a golden step in tests/test_golden_steps.py: {missing}"


def test_every_order_and_variant_knob_value_has_a_golden_case():
    seen: dict = {}
    for name, knobs, _ in CASES:
        for k, v in {**yaml_knobs(name), **knobs}.items():
            seen.setdefault(name, {}).setdefault(k, set()).add(v)
    for name, req in REQUIRED.items():
        for k, vals in req.items():
            assert vals <= seen.get(name, {}).get(k, set()), (name, k, vals - seen.get(name, {}).get(k, set()))


def test_golden_cases_are_not_trivial(gmm_model):
    """Each knob value changes the output on its grid, so the cases above can tell the variants apart."""
    t = _grid(gmm_model, get_solver("unipc"), "G6")
    x_T = _x_T(gmm_model)
    outs = {}
    for key, (name, knobs) in {
        "pp3_taylor": ("dpm_solver_pp", {"order": 3, "d2": "taylor"}),
        "pp3_code": ("dpm_solver_pp", {"order": 3, "d2": "dpm_solver_code"}),
        "uni3_bh1": ("unipc", {"order": 3, "variant": "bh1", "lower_order_final": False}),
        "uni3_bh2": ("unipc", {"order": 3, "variant": "bh2", "lower_order_final": False}),
        "uni3_lof": ("unipc", {"order": 3, "variant": "bh2", "lower_order_final": True}),
    }.items():
        outs[key] = run_both(gmm_model, name, knobs, t, x_T)[0]
    for a, b in (("pp3_taylor", "pp3_code"), ("uni3_bh1", "uni3_bh2"), ("uni3_bh2", "uni3_lof")):
        assert float((outs[a] - outs[b]).abs().max()) > 1e-6, (a, b)


def test_ancestral_variance_beta_differs_from_posterior(gmm_model):
    """The two DDPM variances give different samples from the same noise, by more than rounding: the golden case
    for 'beta' could not pass on the posterior's numbers."""
    t = _grid(gmm_model, get_solver("ancestral"), "G6")
    x_T = _x_T(gmm_model)
    post, beta = (run_both(gmm_model, "ancestral", {"variance": v}, t, x_T)[0] for v in ("posterior", "beta"))
    assert float((post - beta).abs().max()) > 1e-3


def test_dpm_solver_final_and_allocations_differ(gmm_model):
    """final t_end returns x at t[-1] (not its x0-prediction), and allocations of one grid differ from each other."""
    t = _grid(gmm_model, get_solver("dpm_solver"), "G5edm")
    x_T = _x_T(gmm_model)
    out = {k: run_both(gmm_model, "dpm_solver", dict(kn), t, x_T)[0] for k, kn in {
        "x0": {"orders": (3, 3, 3, 1)}, "t_end": {"orders": (3, 3, 3, 1), "final": "t_end"},
        "alt": {"orders": (3, 3, 3, 2)}}.items()}
    assert float((out["x0"] - out["t_end"]).abs().max()) > 1e-4
    assert float((out["x0"] - out["alt"]).abs().max()) > 1e-6
