"""Train the shipped networks from scratch:  python -m bench.models.train NAME [key=value ...]  (NAME: conf/train/)

Hyperparameters live in conf/train/NAME.yaml (override any as key=value); the noise schedule of an
eps-model is read from conf/model/NAME.yaml, so the model is sampled under the schedule it was trained
under. Writes the weights (EMA for eps-models) and a JSON record (config, seed, final loss, wall time).
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

from bench.models import datasets
from bench.models.registry import schedule_from_cfg
from bench.models.unet import ARCHS

from bench import CONF_DIR as CONF, PACKAGE_ROOT as ROOT  # noqa: E402


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    p = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * p))


def eps_loss(net, schedule, x0, gen, cond=None):
    """Continuous-time denoising loss E_t,eps |eps_theta(alpha x0 + sigma eps, t) - eps|^2, t ~ U(t_min, T)
    (Ho et al. 2020, eq. 14; Song et al. 2021, eq. 7 with lambda(t) = sigma^2); with cond, the network sees it."""
    n = x0.shape[0]
    t = schedule.t_min + (schedule.T - schedule.t_min) * torch.rand(n, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen)
    shape = (n,) + (1,) * (x0.dim() - 1)
    a, s = schedule.alpha(t).float().reshape(shape), schedule.sigma(t).float().reshape(shape)
    xt = a * x0 + s * eps
    out = net(xt, t.float()) if cond is None else net(xt, t.float(), cond)
    return ((out - eps) ** 2).mean()


def drop_labels(y, p_uncond: float, null_label: int, gen):
    """Label dropout of classifier-free guidance training (Ho & Salimans 2022, Alg. 1): each label is replaced by
    the null label with probability p_uncond, so one network learns eps(x, t, y) and eps(x, t)."""
    drop = torch.rand(y.shape[0], generator=gen) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


def random_shift(x, gen):
    """The whole batch rolled by a random shift of up to one pixel in each direction (augmentation)."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def classifier_loss(net, x, y, gen):
    """Cross-entropy with a random shift of up to one pixel (augmentation)."""
    return torch.nn.functional.cross_entropy(net(random_shift(x, gen)), y)


def noisy_classifier_loss(net, schedule, x0, y, gen):
    """Cross-entropy of a noise-aware classifier on x_t = alpha x0 + sigma eps, t ~ U(t_min, T), eps ~ N(0, I)
    (the classifier of classifier guidance, Dhariwal & Nichol 2021, sec. 4), x0 shifted as in classifier_loss."""
    x0 = random_shift(x0, gen)
    n = x0.shape[0]
    t = schedule.t_min + (schedule.T - schedule.t_min) * torch.rand(n, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen)
    shape = (n,) + (1,) * (x0.dim() - 1)
    a, s = schedule.alpha(t).float().reshape(shape), schedule.sigma(t).float().reshape(shape)
    return torch.nn.functional.cross_entropy(net(a * x0 + s * eps, t.float()), y)


ACCURACY_TIMES = (0.001, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ACCURACY_SEED = 0   # the fixed noise draw of noisy_accuracy


def noisy_accuracy(classifier, schedule, times=ACCURACY_TIMES, split: str = "test", seed: int = ACCURACY_SEED):
    """Held-out accuracy of a noise-aware classifier at each t, on x_t = alpha x0 + sigma eps with one fixed noise
    draw eps (seeded; the same eps at every t); rows {t, sigma_over_alpha, accuracy, n}."""
    x0, y = datasets.digits(split, with_labels=True)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for t in times:
        tt = torch.full((len(x0),), float(t), dtype=torch.float64)
        a, s = float(schedule.alpha(tt)[0]), float(schedule.sigma(tt)[0])
        with torch.no_grad():
            acc = float((classifier(a * x0 + s * eps, tt.float()).argmax(1) == y).float().mean())
        rows.append({"t": float(t), "sigma_over_alpha": s / a, "accuracy": acc, "n": len(x0)})
    return rows


def train(name: str, overrides: dict | None = None) -> dict:
    cfg = {**load_yaml(CONF / "train" / f"{name}.yaml"), **(overrides or {})}
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["threads"])
    torch.set_flush_denormal(True)
    gen = torch.Generator().manual_seed(cfg["seed"])
    kinds = ("eps", "eps_cond", "classifier", "noisy_classifier")
    if cfg["kind"] not in kinds:
        raise SystemExit(f"conf/train/{name}.yaml: kind '{cfg['kind']}' is not one of {kinds}")
    is_eps, is_cond = cfg["kind"] in ("eps", "eps_cond"), cfg["kind"] == "eps_cond"
    is_noisy = cfg["kind"] == "noisy_classifier"
    net = ARCHS[cfg["arch"]](**cfg["arch_kwargs"])
    if is_eps:
        model_cfg = load_yaml(CONF / "model" / f"{name}.yaml")
        schedule = schedule_from_cfg(model_cfg)
        if is_cond:   # conditional eps-model: (image, label) pairs, labels dropped to the null label at p_uncond
            x, y = datasets.DATASETS[cfg["dataset"]]("train", with_labels=True)
        else:
            x = datasets.DATASETS[cfg["dataset"]]("train")
    elif is_noisy:   # noise-aware classifier: the schedule of the eps-model it guides, conf/model/<model>.yaml
        schedule = schedule_from_cfg(load_yaml(CONF / "model" / f"{cfg['model']}.yaml"))
        x, y = datasets.DATASETS[cfg["dataset"]]("train", with_labels=True)
    else:
        x, y = datasets.digits("train", with_labels=True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    out = ROOT / cfg["out"]
    out.parent.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"training {name}: {n_params} parameters, {len(x)} training points, {cfg['steps']} steps", flush=True)
    t0, run_loss = time.perf_counter(), None
    for step in range(cfg["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        idx = torch.randint(0, len(x), (cfg["batch_size"],), generator=gen)
        if is_cond:
            cond = drop_labels(y[idx], cfg["p_uncond"], net.null_label, gen)
            loss = eps_loss(net, schedule, x[idx], gen, cond)
        elif is_eps:
            loss = eps_loss(net, schedule, x[idx], gen)
        elif is_noisy:
            loss = noisy_classifier_loss(net, schedule, x[idx], y[idx], gen)
        else:
            loss = classifier_loss(net, x[idx], y[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # EMA of weights
            d = cfg["ema"] if step >= cfg["warmup"] else 0.0
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - d)
            for be, b in zip(ema.buffers(), net.buffers()):
                be.copy_(b)
        run_loss = loss.item() if run_loss is None else 0.99 * run_loss + 0.01 * loss.item()
        last = step == cfg["steps"] - 1
        if (step + 1) % cfg["log_every"] == 0 or last:
            print(f"step {step + 1:6d}  loss {run_loss:.4f}  lr {lr_at(step, cfg):.2e}  "
                  f"{time.perf_counter() - t0:7.1f} s", flush=True)
        if (step + 1) % cfg.get("save_every", 10**9) == 0 or last:
            record = {"name": name, "train_config": cfg, "seed": cfg["seed"], "steps_done": step + 1,
                      "final_loss_ema100": run_loss, "wall_time_s": time.perf_counter() - t0,
                      "n_params": n_params, "torch": str(torch.__version__), "threads": cfg["threads"]}
            if is_eps:
                record["schedule"] = schedule.describe()
            elif is_noisy:
                record["schedule"] = schedule.describe()
                record["test_accuracy_by_t"] = noisy_accuracy(ema, schedule)
                print("held-out accuracy by t: " + ", ".join(f"{r['t']:g}: {r['accuracy']:.4f}"
                                                              for r in record["test_accuracy_by_t"]), flush=True)
            else:
                record["test_accuracy"] = accuracy(ema)
                print(f"held-out accuracy {record['test_accuracy']:.4f}", flush=True)
            save(ema, cfg, record, out)
    return record


def accuracy(classifier, split: str = "test") -> float:
    x, y = datasets.digits(split, with_labels=True)
    with torch.no_grad():
        return float((classifier(x).argmax(1) == y).float().mean())


def save(net, cfg: dict, record: dict, out: Path):
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save({"arch": cfg["arch"], "arch_kwargs": net.config, "state_dict": state,
                "dataset": cfg["dataset"], "record": record}, out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = sorted(p.stem for p in (CONF / "train").glob("*.yaml"))
    if not argv or argv[0] not in names:
        print(f"usage: python -m bench.models.train {{{'|'.join(names)}}} [key=value ...]", file=sys.stderr)
        return 2
    overrides = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in argv[1:])}
    train(argv[0], overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
