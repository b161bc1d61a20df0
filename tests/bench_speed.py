"""Speed tracking (pytest-benchmark).  Not collected by the default test run (not a test_*.py file); run with
    pytest tests/bench_speed.py --benchmark-enable     (add --benchmark-autosave / --benchmark-compare to track)
The default model is the exact gmm.  test_per_step_overhead times 10 steps with a free network (eps = 0):
the solver's own work; divide by 10 for one step."""
import pytest
import torch

from bench.models.dynamics import Dynamics
from bench.models.registry import load_model
from bench.solvers.registry import get_solver
from bench.solvers.rng import PerSampleRNG
from bench.solvers.timesteps import make_timesteps

SOLVERS = ["euler", "heun", "rk4"]
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
    benchmark(lambda: spec.fn(Dynamics(_Identity(), model.schedule), x_T, t, rng))


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
    benchmark(lambda: model.net(x_T, t))
