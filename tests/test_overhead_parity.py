"""Issue 17 moved what depends only on the time grid (alpha, sigma, lambda, h, Adams and UniPC weights) out of the
solvers' step loops.  Given the same x_T and the same noise, every solver must give what the code before that
change gave, to 1e-12 in float64: tests/data/overhead_parity.npz holds those outputs, written by
tests/data/make_overhead_parity.py at the commit before the change (fbded08)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_overhead_parity import CASES, OUT, run_cases  # noqa: E402


@pytest.fixture(scope="module")
def outputs():
    return run_cases()


@pytest.fixture(scope="module")
def saved():
    return dict(np.load(OUT))


def test_same_x_T(outputs, saved):
    assert np.array_equal(outputs["x_T"], saved["x_T"])


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_output_agrees_with_the_previous_implementation(outputs, saved, name):
    assert int(outputs[name + "__nfe"]) == int(saved[name + "__nfe"])
    np.testing.assert_allclose(outputs[name], saved[name], rtol=0, atol=1e-12)


# --- fast paths of the command (issue 17, item 4) -------------------------------------------------------------------
def test_fid_extractor_is_built_once_per_cell(tmp_path, monkeypatch):
    """Every call of a cell (protocol, compute: both go through _cell_extractor) reuses the one extractor kept in
    ctx.cache; dict.setdefault built a new one at every call.  Two protocol calls show it without computing FID."""
    sys.path.insert(0, str(Path(__file__).parent))
    from metric_helpers import make_ctx, tiny_image_model

    from bench.metrics import make_metric
    from bench.metrics.fid import FID

    built = []
    real = FID._extractor
    monkeypatch.setattr(FID, "_extractor", lambda self, model: built.append(1) or real(self, model))
    model, _ = tiny_image_model(n_real=40)
    ctx = make_ctx(model, model.real_data("test")[:20], tmp_path)
    fid = make_metric("fid", {"real_split": "train"})
    first = fid.protocol(ctx)
    assert fid.protocol(ctx) == first and len(built) == 1


def test_sampling_time_leaves_out_the_set_up(monkeypatch):
    """generate's seconds are the solver's alone; building the generators and x_T goes to times['setup_s']: a
    generator that takes 0.2 s to build shows there and not in the sampling time."""
    import time

    import torch

    import bench.run as run
    from bench.models.registry import load_model
    from bench.solvers.registry import get_solver
    from bench.solvers.rng import PerSampleRNG
    from bench.solvers.timesteps import make_timesteps

    class SlowRNG(PerSampleRNG):
        def __init__(self, *a, **k):
            time.sleep(0.2)
            super().__init__(*a, **k)

    monkeypatch.setattr(run, "PerSampleRNG", SlowRNG)
    model = load_model({"name": "gmm", "schedule": {"name": "vp_linear"}})
    spec = get_solver("euler")
    t = make_timesteps("edm", model.schedule, 4)
    times = {}
    *_, secs = run.generate(model, spec, {}, t, 4, 4, 0, torch.device("cpu"), torch.float64, times=times)
    assert times["setup_s"] >= 0.2 and secs < 0.2 and secs == times["sampling_s"]
