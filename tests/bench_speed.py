"""Speed tracking (pytest-benchmark).  Not collected by the default test run (not a test_*.py file); run with
    pytest tests/bench_speed.py --benchmark-enable     (add --benchmark-autosave / --benchmark-compare to track)
The default model is the exact gmm.  test_per_step_overhead times 10 steps with a free network (eps = 0):
the solver's own work; divide by 10 for one step.  test_own_cost_per_nfe does the same for every solver of
`python -m bench overhead` at NFE 18 and batches 16 and 1024 on the digits model's shape and records the cost per NFE
in extra_info; test_wall_over_in_network records the ratio wall / in-network with the digits UNet; test_rng_draw times
one per-sample draw against one torch.randn of the same batch (issue 17)."""
import pytest
import torch

from bench.models.dynamics import Dynamics
from bench.models.registry import load_model
from bench.solvers.registry import get_solver
from bench.solvers.rng import PerSampleRNG
from bench.solvers.timesteps import make_timesteps

SOLVERS = ["euler", "heun", "rk4"]
OVERHEAD_SOLVERS = ["euler", "heun", "rk4", "ab", "unipc", "dpm_solver", "dpm_solver_pp", "deis", "ipndm_v",
                    "ancestral", "euler_maruyama", "edm_stochastic", "pc", "dpm_solver_pp_sde", "sa_solver"]
BATCH = 256


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = load_model({"name": "gmm", "dim": 4, "n_components": 3, "seed": 0, "schedule": {"name": "vp_linear"}})
    rng = PerSampleRNG(0, range(BATCH))
    x_T = rng.randn(model.shape) * model.schedule.prior_std()
    return model, rng, x_T


class _Identity:
    """A free network (eps = 0): timing a solver with it measures the solver's own per-step work."""

    def __call__(self, x, t):
        return torch.zeros_like(x)


@pytest.mark.parametrize("solver", SOLVERS)
def test_per_step_overhead(benchmark, setup, solver):
    model, rng, x_T = setup
    spec = get_solver(solver)
    t = make_timesteps(spec.default_timesteps, model.schedule, 11)
    benchmark.extra_info["steps"] = 10
    out = benchmark(lambda: spec.fn(Dynamics(_Identity(), model.schedule), x_T, t, rng))
    assert out.shape == x_T.shape and bool(torch.isfinite(out).all())     # the timed call sampled


@pytest.mark.parametrize("solver", SOLVERS)
def test_end_to_end_sampling(benchmark, setup, solver):
    model, rng, x_T = setup
    spec = get_solver(solver)
    steps = spec.steps_for(33)
    t = make_timesteps(spec.default_timesteps, model.schedule, steps)

    def sample():
        dyn = Dynamics(model.net, model.schedule)
        with torch.inference_mode():
            spec.fn(dyn, x_T, t, rng)
        return dyn.nfe
    nfe = benchmark(sample)
    benchmark.extra_info["nfe"] = nfe
    assert nfe <= 33


def test_network_forward(benchmark, setup):
    model, _, x_T = setup
    t = torch.full((BATCH,), 0.5)
    out = benchmark(lambda: model.net(x_T, t))
    assert out.shape == x_T.shape and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("batch", [16, 1024])
@pytest.mark.parametrize("solver", OVERHEAD_SOLVERS)
def test_own_cost_per_nfe(benchmark, solver, batch):
    """A solver's own cost per NFE (issue 17 targets on 2 CPU cores: <= 20 us deterministic, <= 40 us stochastic)."""
    from bench.overhead import NullNet, _case, compose, time_once

    torch.set_num_threads(1)
    case = _case(compose(solver, 18, batch, ["model=digits"]), "null", torch.device("cpu"), torch.float32)
    r = benchmark(lambda: time_once(case, torch.device("cpu")))
    benchmark.extra_info.update(nfe=r["nfe"], own_us_per_nfe=benchmark.stats.stats.median / r["nfe"] * 1e6)
    assert isinstance(case[5], NullNet)


@pytest.mark.parametrize("batch", [16, 1024])
@pytest.mark.parametrize("solver", OVERHEAD_SOLVERS)
def test_wall_over_in_network(benchmark, solver, batch):
    """Wall / in-network time with the digits UNet (issue 17 targets: <= 1.03 at batch 16, <= 1.01 at batch 1024),
    median over the rounds in extra_info; a batch-1024 round takes about 4 s, so it runs 3 rounds."""
    from bench.overhead import _case, compose, time_once

    torch.set_num_threads(1)
    case = _case(compose(solver, 18, batch, ["model=digits"]), "model", torch.device("cpu"), torch.float32)
    runs = []
    benchmark.pedantic(lambda: runs.append(time_once(case, torch.device("cpu"))), rounds=3 if batch > 256 else 7,
                       iterations=1)
    ratios = sorted(r["wall"] / r["in_net"] for r in runs)
    benchmark.extra_info.update(nfe=runs[-1]["nfe"], ratio=ratios[len(ratios) // 2])
    assert all(r["in_net"] > 0 and r["wall"] >= r["in_net"] for r in runs)


@pytest.mark.parametrize("batch", [16, 1024])
@pytest.mark.parametrize("how", ["per_sample", "torch_randn"])
def test_rng_draw(benchmark, batch, how):
    """One (batch, 1, 8, 8) draw: per-sample streams (PerSampleRNG) against one torch.randn of the batch."""
    torch.set_num_threads(1)
    rng = PerSampleRNG(0, range(batch))
    draw = (lambda: rng.randn((1, 8, 8))) if how == "per_sample" else (lambda: torch.randn(batch, 1, 8, 8))
    assert benchmark(draw).shape == (batch, 1, 8, 8)
