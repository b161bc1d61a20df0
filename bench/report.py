"""`python -m bench report`: per model, tables (solvers x NFE) of every metric, quality-vs-NFE plots with fitted
orders, and grids of the saved samples, under results/report/<model>/."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench import store
from bench.metrics.trunc import fit_order as trunc_fit_order
from bench import CONF_DIR

# How each known quality column is shown; any other numeric metric column gets a linear plot.
#   log: log-log axes;  order: fit and show the convergence order (error columns)
QUALITY = {
    "trunc_rms": {"label": "truncation error (RMS)", "log": True, "order": True},
    "trunc_strong_rms": {"label": "strong error of stochastic solvers (RMS, same Brownian path)", "log": True,
                         "order": True},
    "fid": {"label": "FID", "log": True, "order": False},
    "nll_bpd": {"label": "NLL (bits/dim)", "log": False, "order": False},
}
NOT_QUALITY_SUFFIXES = ("_nfe", "_note", "_s", "_seconds", "_se", "_n_ref", "_n", "_real_test")   # bookkeeping, not quality


def fit_order(nfe, err) -> float:
    """Empirical order p of err ~ C NFE^-p (bench.metrics.trunc.fit_order); NaN where it cannot be fitted."""
    try:
        return trunc_fit_order(list(map(float, nfe)), [float(e) for e in err])[0]
    except ValueError:
        return float("nan")


def _solver_defaults(name: str) -> dict:
    """Knob defaults of a solver, from conf/solver/NAME.yaml."""
    import yaml

    path = CONF_DIR / "solver" / f"{name}.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def solver_label(row) -> str:
    """Solver name, plus the knobs that differ from its conf/solver defaults."""
    knobs = json.loads(row["solver_knobs"]) if isinstance(row["solver_knobs"], str) else (row["solver_knobs"] or {})
    defaults = _solver_defaults(row["solver"])
    extra = [f"{k}={v}" for k, v in sorted(knobs.items()) if defaults.get(k, object()) != v]
    return row["solver"] + (f" ({', '.join(extra)})" if extra else "")


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric metric columns present in these rows (known quality columns first)."""
    cols = set()
    for m in df["metrics"].dropna():
        for k, v in json.loads(m).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(NOT_QUALITY_SUFFIXES):
                cols.add(k)
    return [c for c in QUALITY if c in cols] + sorted(cols - set(QUALITY))


def latest_cells(df: pd.DataFrame) -> pd.DataFrame:
    """Finished rows, the newest per (solver label, time steps, NFE budget) within a model."""
    df = df[df["status"].isin(store.DONE)].copy()
    if df.empty:
        return df
    df["label"] = [solver_label(r) for _, r in df.iterrows()]
    if df.groupby("model")["timesteps"].transform("nunique").max() > 1:
        df["label"] = df["label"] + " [" + df["timesteps"] + "]"
    return df.sort_values("id").groupby(["model", "label", "nfe_budget"], as_index=False).last()


def table(df: pd.DataFrame, col: str) -> pd.DataFrame:
    """Solvers as rows, NFE budget as columns; 'diverged' where the cell diverged."""
    vals = df[col].astype(object).where(df["status"] == "ok", "diverged")
    t = pd.DataFrame({"solver": df["label"], "nfe": df["nfe_budget"].astype(int), "v": vals})
    return t.pivot(index="solver", columns="nfe", values="v").sort_index()


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}"


def to_markdown(t: pd.DataFrame, title: str) -> str:
    head = "| solver | " + " | ".join(f"NFE {c}" if not isinstance(c, str) else c for c in t.columns) + " |"
    sep = "|---|" + "---:|" * len(t.columns)
    body = ["| " + str(i) + " | " + " | ".join(_fmt(v) for v in r) + " |" for i, r in t.iterrows()]
    return "\n".join([f"### {title}", "", head, sep, *body, ""])


def plot_metric(df: pd.DataFrame, col: str, path: Path, model: str) -> dict:
    """Quality against counted NFE, one line per solver; fitted order in the legend for error columns.
    Returns {solver label: fitted order} (empty when the column is not an error)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = QUALITY.get(col, {"label": col, "log": False, "order": False})
    fig, ax = plt.subplots(figsize=(8.4, 4.6))
    orders = {}
    for label, g in df[df["status"] == "ok"].groupby("label"):
        g = g.sort_values("nfe")
        y = pd.to_numeric(g[col], errors="coerce")
        if y.notna().sum() == 0:
            continue
        name = label
        if q["order"]:
            orders[label] = fit_order(g["nfe"], y)
            name = f"{label} (order {orders[label]:.2f})"
        ax.plot(g["nfe"], y, "o-", label=name)
    if q["log"]:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("NFE (counted)")
    ax.set_ylabel(q["label"])
    ax.set_title(f"{model}: {q['label']} against NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)   # outside the axes
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return orders


def load_samples(results_dir, rel) -> np.ndarray | None:
    """A row's saved samples (npz without pickle, path checked to stay inside results_dir), or None with a warning
    when the file is missing, corrupt or unsafe."""
    from bench import fsio

    if not isinstance(rel, str) or not rel:
        return None
    p = fsio.inside(results_dir, rel, "samples_path")
    if not p.exists():
        return None
    try:
        return fsio.load_npz(p, "sample file")["samples"]
    except (fsio.UnsafeFile, KeyError) as e:
        fsio.warn_once(f"samples:{p}", f"{e if isinstance(e, fsio.UnsafeFile) else f'{p} has no samples array'}; "
                                       f"left out of the sample grid")
        return None


def sample_grid(df: pd.DataFrame, results_dir, path: Path, model: str, n_show: int = 64) -> bool:
    """Grid of saved samples, solvers as rows and NFE as columns: scatter plots for vector samples
    (the first two coordinates; 2-D for toy2d), image mosaics for image-shaped samples (C,H,W) or (H,W)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = df[df["status"] == "ok"]
    cells = {(r["label"], int(r["nfe_budget"])): load_samples(results_dir, r.get("samples_path"))
             for _, r in df.iterrows()}
    cells = {k: v for k, v in cells.items() if v is not None}
    if not cells:
        return False
    first = next(iter(cells.values()))
    if first.ndim == 2 and first.shape[1] < 2:
        return False
    if first.ndim == 2:    # one frame for every scatter plot, so cells compare at a glance
        pts = np.concatenate([v[:n_show, :2] for v in cells.values()])
        pts = pts[np.isfinite(pts).all(axis=1)]
        lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
        pad = 0.1 * (hi - lo) + 1e-9
        lo, hi = lo - pad, hi + pad
    labels = sorted({k[0] for k in cells})
    nfes = sorted({k[1] for k in cells})
    fig, axes = plt.subplots(len(labels), len(nfes), figsize=(1.9 * len(nfes) + 1, 1.9 * len(labels) + 0.6),
                             squeeze=False)
    for i, lab in enumerate(labels):
        for j, n in enumerate(nfes):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"NFE {n}", fontsize=9)
            if j == 0:
                ax.set_ylabel(lab.replace(" (", "\n("), fontsize=7)
            x = cells.get((lab, n))
            if x is None:
                continue
            x = x[:n_show]
            if x.ndim == 2:
                ax.scatter(x[:, 0], x[:, 1], s=3)
                ax.set_xlim(lo[0], hi[0])
                ax.set_ylim(lo[1], hi[1])
            else:
                ax.imshow(mosaic(x), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")   # dark ink, as the data
    fig.suptitle(f"{model}: samples by solver and NFE", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def mosaic(x: np.ndarray) -> np.ndarray:
    """(n, C, H, W) or (n, H, W) images in [-1, 1] -> one gray mosaic (channels averaged), 1-px gaps."""
    if x.ndim == 4:
        x = x.mean(axis=1)
    n, h, w = x.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = np.zeros((rows * (h + 1) - 1, cols * (w + 1) - 1))     # mid-gray gaps
    for k in range(n):
        r, c = divmod(k, cols)
        out[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = np.clip(x[k], -1, 1)
    return out


def report(results_dir="results", out_dir=None) -> list[Path]:
    """Write tables, plots and sample grids for every model in the store; returns the files written."""
    out_dir = Path(out_dir) if out_dir else Path(results_dir) / "report"
    df = latest_cells(store.load_runs(results_dir))
    written = []
    for model, g in df.groupby("model"):
        from bench import fsio
        d = out_dir / fsio.safe_name(model, "model name")
        d.mkdir(parents=True, exist_ok=True)
        md = [f"# {model}: quality against NFE", "",
              f"{g['label'].nunique()} solvers (rows),  NFE budgets {sorted(int(n) for n in g['nfe_budget'].unique())}; "
              f"newest finished row per cell; `order` = fitted slope of log error against log NFE; code {', '.join(sorted(g['code_version'].astype(str).unique()))}.", ""]
        for col in metric_columns(g):
            t = table(g, col)
            t.to_csv(d / f"{col}.csv")
            written.append(d / f"{col}.csv")
            orders = plot_metric(g, col, d / f"{col}.png", model)
            written.append(d / f"{col}.png")
            if orders:
                t = t.assign(order=[orders.get(i, float("nan")) for i in t.index])
            md += [to_markdown(t, QUALITY.get(col, {"label": col})["label"] + f" (`{col}`)"), f"![{col}]({col}.png)", ""]
        if sample_grid(g, results_dir, d / "samples.png", model):
            written.append(d / "samples.png")
            md += ["### Samples", "", "![samples](samples.png)", ""]
        (d / "report.md").write_text("\n".join(md))
        written.append(d / "report.md")
    return written
