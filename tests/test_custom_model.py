"""model=custom: a user's eps-network by import path, with its time-input convention from YAML."""
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
