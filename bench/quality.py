"""Quality check of the shipped networks at high NFE:  python -m bench.quality [digits|toy2d] [key=value ...]

digits: a PNG grid of 64 samples and the fraction of n_samples samples that the digits classifier labels
with confidence >= threshold (the bar is 0.9 of samples at confidence 0.9).  toy2d: a scatter plot of
samples beside the held-out data.  Knobs: conf/quality.yaml.  Figures go to results/figures/.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

from bench.run import generate, resolve_device
from bench.models.registry import load_model
from bench.solvers.registry import get_solver
from bench.solvers.timesteps import make_timesteps
from bench import CONF_DIR



def sample(model_name: str, solver: str, nfe: int, n: int, seed: int = 0, batch_size: int = 500, device="cpu"):
    import bench.solvers.all  # noqa: F401

    with open(CONF_DIR / "model" / f"{model_name}.yaml") as f:
        model = load_model(yaml.safe_load(f))
    spec = get_solver(solver)
    with open(CONF_DIR / "solver" / f"{solver}.yaml") as f:
        knobs = {k: v for k, v in yaml.safe_load(f).items() if k != "name"}
    t = make_timesteps(spec.default_timesteps, model.schedule, spec.steps_for(nfe, **knobs))
    _, x0, nfes, secs = generate(model, spec, knobs, t, n, batch_size, seed, resolve_device(device), torch.float32)
    return model, x0, nfes[0], secs


def confident_fraction(model, x0, threshold: float = 0.9) -> tuple[float, list[int]]:
    """Fraction of samples the classifier labels with probability >= threshold, and the label histogram."""
    lo, hi = model.data_range
    p = model.feature_net.probs(x0.clamp(lo, hi))
    conf, label = p.max(1)
    return float((conf >= threshold).float().mean()), torch.bincount(label, minlength=10).tolist()


def save_grid(x0, path: Path, data_range=(-1, 1), ncol: int = 8):
    """The first ncol^2 images as one mosaic (bench.report.mosaic: the report's sample grids look the same)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report import mosaic

    lo, hi = data_range
    imgs = (2 * (x0[:ncol * ncol].clamp(lo, hi) - lo) / (hi - lo) - 1).cpu().numpy()   # to [-1, 1]
    fig, ax = plt.subplots(figsize=(ncol, ncol))
    ax.imshow(mosaic(imgs), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.axis("off")
    fig.subplots_adjust(left=0, right=1, top=1, bottom=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)


def save_scatter(x0, real, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, pts, name in ((axes[0], real, "held-out data"), (axes[1], x0, title)):
        ax.scatter(pts[:, 0].cpu(), pts[:, 1].cpu(), s=2, alpha=0.5)
        ax.set_title(name)
        ax.set_aspect("equal")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv and "=" not in argv[0] else "digits"
    with open(CONF_DIR / "quality.yaml") as f:
        cfg = yaml.safe_load(f)[name]
    cfg.update({k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in argv if "=" in a)})
    model, x0, nfe, secs = sample(name, cfg["solver"], cfg["nfe"], cfg["n_samples"], cfg["seed"])
    out = ROOT / cfg["figure"]
    report = {"model": name, "solver": cfg["solver"], "nfe": nfe, "n_samples": cfg["n_samples"],
              "seed": cfg["seed"], "sampling_s": round(secs, 1), "figure": cfg["figure"]}
    if name == "digits":
        save_grid(x0, out, model.data_range)
        frac, hist = confident_fraction(model, x0, cfg["threshold"])
        report.update({"confident_fraction": frac, "threshold": cfg["threshold"], "label_histogram": hist})
    else:
        save_scatter(x0, model.real_data("test"), out, f"{cfg['solver']}, NFE {nfe}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
