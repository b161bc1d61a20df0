"""The shipped noise-aware digits classifier p_t(y | x_t) of classifier guidance: held-out accuracy against the
measured bars, float64 = float32, the input gradient against finite differences, loader errors, the train kind."""
import copy
import math

import pytest
import torch

from bench import CONF_DIR
from bench.models import datasets, shipped
from bench.models.errors import ConfigError
from bench.models.netio import resolve_path
from bench.models.registry import schedule_from_cfg
from bench.models.train import ACCURACY_TIMES, load_yaml, train

WEIGHTS = "models/weights/digits_noisy_classifier.pt"
needs_weights = pytest.mark.skipif(not resolve_path(WEIGHTS, "test").exists(),
                                   reason="train with python -m bench.models.train digits_noisy_classifier")
# Held-out accuracy (n = 359) measured by the training run (models/weights/digits_noisy_classifier.json, noise
# seed 0) minus ~3 binomial SE; this test draws its own noise (seed 1), so the bar covers that draw too.
BARS = {0.001: 0.98, 0.3: 0.51}


@pytest.fixture(scope="module")
def net():
    return shipped.load_noisy_classifier(WEIGHTS)


@pytest.fixture(scope="module")
def schedule():
    return schedule_from_cfg(load_yaml(CONF_DIR / "model" / "digits.yaml"))


def vp_linear_ratio(t, beta_min=0.1, beta_max=20.0):
    """sigma/alpha of the linear VP SDE in closed form: sqrt(exp(int_0^t beta) - 1) (Song et al. 2021, eq. 29)."""
    return math.sqrt(math.expm1(beta_min * t + 0.5 * (beta_max - beta_min) * t * t))


def noisy_test_set(t, seed=1, dtype=torch.float32):
    x0, y = datasets.digits("test", with_labels=True)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = vp_linear_ratio(t)
    alpha = 1 / math.sqrt(1 + r * r)       # VP: alpha^2 + sigma^2 = 1
    return (alpha * (x0.double() + r * eps)).to(dtype), y


@needs_weights
@pytest.mark.parametrize("t", sorted(BARS))
def test_heldout_accuracy_at_small_t_is_above_the_measured_bar(net, t):
    x, y = noisy_test_set(t)
    acc = float((net(x, torch.full((len(x),), t)).argmax(1) == y).float().mean())
    assert acc >= BARS[t], (t, acc)


@needs_weights
def test_heldout_accuracy_at_T_is_chance(net):
    x, y = noisy_test_set(1.0)
    acc = float((net(x, torch.full((len(x),), 1.0)).argmax(1) == y).float().mean())
    assert abs(acc - 0.1) <= 4 * math.sqrt(0.1 * 0.9 / len(x)), acc


@needs_weights
def test_record_matches_the_closed_form_schedule_and_is_monotone_enough(net):
    rows = net.record["test_accuracy_by_t"]
    assert [r["t"] for r in rows] == list(ACCURACY_TIMES)
    for r in rows:
        assert r["n"] == 359 and r["sigma_over_alpha"] == pytest.approx(vp_linear_ratio(r["t"]), rel=1e-9)
    acc = [r["accuracy"] for r in rows]
    assert acc[0] >= 0.97 and acc[0] > acc[3] > acc[5] and abs(acc[-1] - 0.1) < 0.07, acc


@needs_weights
def test_float64_logits_equal_float32(net):
    x, _ = noisy_test_set(0.2, dtype=torch.float64)
    x = x[:64]
    t = torch.linspace(0.001, 1.0, 64, dtype=torch.float64)
    l64 = copy.deepcopy(net).double()(x, t)
    l32 = net(x.float(), t.float())
    assert l64.dtype == torch.float64
    assert (l64 - l32.double()).abs().max() <= 1e-5 * max(1.0, float(l64.abs().max())), (l64 - l32).abs().max()


@needs_weights
def test_input_gradient_of_log_prob_equals_central_difference_float64(net):
    """grad_x sum_i log p_t(y_i | x_i), the guidance term, against a central difference along a random direction."""
    net64 = copy.deepcopy(net).double()
    gen = torch.Generator().manual_seed(3)
    x, y = noisy_test_set(0.3, dtype=torch.float64)
    x, y = x[:16].clone().requires_grad_(True), y[:16]
    t = 0.001 + 0.999 * torch.rand(16, generator=gen, dtype=torch.float64)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def logp(z):
        return torch.log_softmax(net64(z, t), dim=1).gather(1, y[:, None]).sum()

    (g,) = torch.autograd.grad(logp(x), x)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    h = 1e-5
    with torch.no_grad():
        fd = (logp(x + h * v) - logp(x - h * v)) / (2 * h)
    directional = float((g * v).sum())
    assert abs(directional) > 1e-3
    assert directional == pytest.approx(float(fd), rel=1e-6)


def test_loader_rejects_another_arch_and_a_missing_file():
    with pytest.raises(ConfigError, match="'digit_classifier' network.*expected a 'noisy_digit_classifier'"):
        shipped.load_noisy_classifier("models/weights/digits_classifier.pt")
    with pytest.raises(ConfigError, match="nope.pt.*does not exist.*bench.models.train digits_noisy_classifier"):
        shipped.load_noisy_classifier("nope.pt")


@needs_weights
def test_loader_rejects_another_schedule(net):
    from bench.models.schedules import make_schedule
    with pytest.raises(ConfigError, match="trained under schedule"):
        shipped.load_noisy_classifier(WEIGHTS, schedule=make_schedule("vp_cosine"))


def test_train_kind_records_accuracy_at_the_11_times(tmp_path, schedule):
    out = tmp_path / "c.pt"
    kw = {"in_ch": 1, "base": 8, "mults": [1, 2], "t_dim": 16, "n_classes": 10}
    with torch.random.fork_rng(devices=[]):
        try:
            rec = train("digits_noisy_classifier", {"steps": 3, "warmup": 1, "batch_size": 8, "log_every": 10**6,
                                                    "arch_kwargs": kw, "out": str(out)})
        finally:
            torch.set_flush_denormal(False)
    rows = rec["test_accuracy_by_t"]
    assert [r["t"] for r in rows] == list(ACCURACY_TIMES) and len(rows) == 11
    assert all(r["n"] == 359 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert [r["sigma_over_alpha"] for r in rows] == pytest.approx([vp_linear_ratio(r["t"]) for r in rows], rel=1e-9)
    assert rec["schedule"] == schedule.describe()
    # the written checkpoint round-trips: the loader rebuilds the tiny arch and reproduces the recorded accuracies
    small = shipped.load_noisy_classifier(out)
    x0, y = datasets.digits("test", with_labels=True)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for r in rows[::5]:
        tt = torch.full((len(x0),), r["t"], dtype=torch.float64)
        a, s = float(schedule.alpha(tt)[0]), float(schedule.sigma(tt)[0])
        acc = float((small(a * x0 + s * eps, tt.float()).argmax(1) == y).float().mean())
        assert acc == r["accuracy"]
