"""Device, precision and compile knobs of a run; weights load once per process even in a Hydra multirun."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.models.errors import ConfigError
from bench.models.netio import compile_model
from bench.models.registry import load_model

ROOT = Path(__file__).resolve().parents[1]
TOY2D = {"name": "toy2d", "weights": "models/weights/toy2d_mlp.pt",
         "schedule": {"name": "vp_linear", "beta_min": 0.1, "beta_max": 20.0, "T": 1.0, "t_min": 0.001}}


@pytest.mark.slow
def test_compiled_network_gives_the_same_eps():
    model = load_model(TOY2D)
    comp = compile_model(model, "eager")
    assert comp.net is not model.net and compile_model(model, "eager") is comp   # compiled once
    assert compile_model(model, False) is model
    x, t = torch.randn(16, 2), torch.rand(16)
    assert torch.allclose(comp.net(x, t), model.net(x, t))


def test_unknown_compile_backend_is_an_error():
    with pytest.raises(ConfigError, match="Unknown compile backend 'nope'.*false, true"):
        compile_model(load_model(TOY2D), "nope")


@pytest.mark.slow
def test_a_backend_that_cannot_compile_here_is_a_config_error_before_any_work(monkeypatch):
    # as inductor without a C++ compiler: torch.compile succeeds lazily and the first call raises
    import bench.models.netio as netio

    def broken(fn, backend=None):
        def call(*a):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return call
    monkeypatch.setattr(netio, "_BACKENDS_OK", set())
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ConfigError, match="backend 'eager'.*does not work here.*InvalidCxxCompiler.*compile=false"):
        compile_model(load_model(TOY2D), "eager")


def test_multirun_loads_the_weights_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "bench", "run", "-m", "model=toy2d", "solver=euler,heun", "nfe=6",
                        "n_samples=8", "metrics=[]", "progress=false", f"results_dir={tmp_path}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert out.count("#1 : model=toy2d") == 1 and out.count("loading weights") == 1, out
