"""model=custom: a user's eps-network by import path, with its time-input convention from YAML."""
import math

import pytest
import torch
from torch import nn

from bench.models.errors import ConfigError
from bench.models.registry import load_model

VP = {"name": "vp_linear", "beta_min": 0.1, "beta_max": 20.0, "T": 1.0, "t_min": 0.001}


class TimeProbe(nn.Module):
    """Returns its time input broadcast to x's shape, so a test can read what the network received."""

    def __init__(self, bias: float = 0.0):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(bias))

    def forward(self, x, t_in):
        return torch.zeros_like(x) + t_in.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) + self.bias


def make_probe(bias=0.0):
    return TimeProbe(bias)


def make_not_a_module():
    return lambda x, t: x


def _cfg(**over):
    c = {"name": "custom", "factory": f"{__name__}:make_probe", "shape": [3], "schedule": dict(VP)}
    c.update(over)
    return c


def test_time_input_conventions():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x = torch.zeros(3, 3, dtype=torch.float64)
    m = load_model(_cfg(time_input="t", time_scale=999.0))
    assert torch.allclose(m.net(x, t)[:, 0], 999 * t)
    m = load_model(_cfg(time_input="sigma"))
    assert torch.allclose(m.net(x, t)[:, 0], m.schedule.sigma(t) / m.schedule.alpha(t))
    m = load_model(_cfg(time_input="step", schedule={"name": "vp_discrete", "num_steps": 100}))
    tn = torch.tensor([1, 50, 100], dtype=torch.float64) / 100
    assert torch.allclose(m.net(x, tn)[:, 0], torch.tensor([0.0, 49.0, 99.0], dtype=torch.float64))


def test_step_input_with_continuous_schedule_is_an_error():
    with pytest.raises(ConfigError, match="time_input 'step'.*vp_discrete.*'vp_linear' is continuous"):
        load_model(_cfg(time_input="step"))


def test_unknown_time_input_bad_factory_and_non_module():
    with pytest.raises(ConfigError, match="unknown time_input 'seconds'.*t, step, sigma"):
        load_model(_cfg(time_input="seconds"))
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg.nets'"):
        load_model(_cfg(factory="no_such_pkg.nets:make"))
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        load_model(_cfg(factory=f"{__name__}:missing"))
    with pytest.raises(ConfigError, match="not a torch nn.Module"):
        load_model(_cfg(factory=f"{__name__}:make_not_a_module"))


def test_weights_and_shape_errors(tmp_path):
    p = tmp_path / "probe.pt"
    torch.save({"bias": torch.tensor(2.5)}, p)
    m = load_model(_cfg(weights=str(p)))
    assert torch.allclose(m.net(torch.zeros(1, 3), torch.tensor([0.5])), torch.full((1, 3), 3.0))
    torch.save({"other": torch.tensor(1.0)}, tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match="wrong.pt.*do not fit"):
        load_model(_cfg(weights=str(tmp_path / "wrong.pt")))
    with pytest.raises(ConfigError, match="missing.pt.*does not exist"):
        load_model(_cfg(weights=str(tmp_path / "missing.pt")))
    with pytest.raises(ConfigError, match="data_range must be"):
        load_model(_cfg(data_range=[1, -1]))


def test_shipped_mlp_as_custom_equals_toy2d():
    """The example in conf/model/custom.yaml's comment: the two-moons MLP by import path, composed on the command
    line over the neutral custom.yaml, gives model=toy2d's eps."""
    import yaml

    import bench.api

    cfg = bench.api.config("model=custom", "model.factory=bench.models.unet:MLPEps",
                           "model.kwargs={dim:2,hidden:256,depth:4,t_dim:64}", "model.weights=models/weights/toy2d_mlp.pt",
                           "model.shape=[2]", "model.schedule.beta_min=0.1", "model.schedule.beta_max=20")
    custom = load_model(cfg["model"])
    with open("conf/model/toy2d.yaml") as f:
        toy = load_model(yaml.safe_load(f))
    x, t = torch.randn(8, 2), torch.rand(8) * 0.9 + 0.05
    assert torch.allclose(custom.net(x, t), toy.net(x, t), atol=1e-6)
    assert not torch.allclose(toy.net(x, t), torch.zeros(8, 2), atol=1e-3)
    assert custom.schedule.t_min == toy.schedule.t_min and custom.schedule.T == toy.schedule.T


# --- the commented examples of conf/model/custom.yaml, run as written (issue 10, item 5) ----------------------
MY_PKG_NETS = '''
import torch
from torch import nn


class StepNet(nn.Module):
    """A user's eps-network fed the DDPM step index: eps = tanh(a x + b n / 200)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(0.0)), nn.Parameter(torch.tensor(0.0))

    def forward(self, x, step):
        return torch.tanh(self.a * x + self.b * step.reshape(-1, 1, 1, 1).to(x.dtype) / 200)


def make_net():
    return StepNet()
'''
# Overrides appended to each example: fewer samples, a cheap NLL solve and this test's results_dir; they shrink the
# work and change nothing the example declares.
QUICK = ["n_samples=16", "nfe=6", "progress=false", "metric_cfg.nll.solver=heun", "metric_cfg.nll.nfe=20",
         "metric_cfg.nll.n_points=8", "save_samples=0"]


def yaml_example_commands(path):
    """The commands in a YAML's leading comment: lines '#   python ...', continued by a trailing backslash."""
    import shlex

    cmds, cur = [], None
    for line in open(path):
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        if cur is None and not (line.startswith("#   python ") and body.startswith("python ")):
            continue
        cur = body.rstrip("\\").strip() if cur is None else cur + " " + body.rstrip("\\").strip()
        if not body.endswith("\\"):
            cmds.append(shlex.split(cur))
            cur = None
    return cmds


def _row(results_dir, model):
    from bench import store

    df = store.load_runs(results_dir)
    df = df[df["model"] == model]
    assert len(df) == 1 and df.iloc[0]["status"] == "ok", df
    return df.iloc[0]


@pytest.mark.slow
def test_every_example_in_custom_yaml_runs_as_written(tmp_path, monkeypatch):
    """Parses the commands out of conf/model/custom.yaml's comment and runs each from a user's directory (with
    the user's package my_pkg the first example names); each custom row then equals its built-in twin."""
    import subprocess
    import sys

    from bench import PACKAGE_ROOT
    from test_faults import run_cli

    cmds = yaml_example_commands(PACKAGE_ROOT / "conf" / "model" / "custom.yaml")
    bench_runs = [c[3:] for c in cmds if c[:4] == ["python", "-m", "bench", "run"]]
    assert len(bench_runs) == 3 and len(cmds) == 4          # three runs and the line that writes digits.npz
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "nets.py").write_text(MY_PKG_NETS)
    torch.save({"a": torch.tensor(0.7), "b": torch.tensor(-0.4)}, tmp_path / "net.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        for c in cmds:
            if c[:2] == ["python", "-c"]:
                subprocess.run([sys.executable, *c[1:]], check=True, cwd=tmp_path)
        assert (tmp_path / "digits.npz").is_file()
        for i, args in enumerate(bench_runs):
            res = tmp_path / f"res{i}"
            rc, out, err = run_cli(*args, *QUICK, f"results_dir={res}")
            assert rc == 0, (args, out, err)
            row = _row(res, "custom")
            twin = {1: "toy2d", 2: "digits"}.get(i)
            if twin is None:        # the user's checkpoint: its weights and step input reached the network
                import json

                m = load_model(json.loads(row["config"])["model"] if isinstance(row["config"], str) else row["config"]["model"])
                x, n = torch.randn(3, 1, 28, 28), torch.tensor([0.0, 99.0, 199.0])
                want = torch.tanh(0.7 * x + (-0.4) * n.reshape(-1, 1, 1, 1) / 200)
                assert torch.allclose(m.net(x, (n + 1) / 200), want, atol=1e-6)
                assert math.isfinite(row["trunc_rms"])
                continue
            metrics = [a for a in args if a.startswith("metrics=")]
            rc, out, err = run_cli("run", f"model={twin}", *metrics, *QUICK, f"results_dir={res}")
            assert rc == 0, (twin, out, err)
            ref = _row(res, twin)
            cols = {0: [], 1: ["trunc_rms"], 2: ["fid", "fid_real_test", "nll_bpd", "nll_bpd_se"]}[i]
            for col in cols:
                assert row[col] == pytest.approx(ref[col], rel=1e-9), (twin, col, row[col], ref[col])
    finally:
        for k in [k for k in sys.modules if k == "my_pkg" or k.startswith("my_pkg.")]:
            del sys.modules[k]
