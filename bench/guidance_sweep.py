"""Table and figure of a guidance sweep (solvers x NFE x guidance scale):

    python -m bench run -m model=digits_cond solver=heun,dpm_solver,dpm_solver_pp,unipc nfe=10,20 \\
        guidance_scale=1,3,5,8 'metrics=[fid,trunc,label_acc]' results_dir=DIR
    python -m bench.guidance_sweep DIR [results/figures/guidance_sweep.png]
    # classifier guidance (score + s grad log p_t(y | x)) on the unconditional digits model:
    python -m bench run -m model=digits classifier_scale=0,1,2,4 ... results_dir=DIR2
    python -m bench.guidance_sweep DIR2 results/figures/classifier_guidance_sweep.png --model digits \\
        --scale classifier_scale

One panel per metric (FID, label accuracy, truncation error) against the guidance scale, one line per solver
and NFE budget, error bars +- 1 standard error; the markdown table goes to stdout.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from bench import store
from bench.metrics.columns import all_columns
from bench.report import newest_per_cell, solver_label

METRICS = ("fid", "label_acc", "trunc_rms")
SHORT = {"fid": "FID", "label_acc": "label accuracy", "trunc_rms": "truncation error (RMS per dim)"}


SCALES = {"guidance_scale": "classifier-free guidance", "classifier_scale": "classifier guidance"}


def sweep_frame(results_dir, model: str = "digits_cond", scale: str = "guidance_scale") -> pd.DataFrame:
    """Newest finished row per cell of `model` that has a `scale` (guidance_scale or classifier_scale), metric
    columns flattened; the scale is copied to the column 'scale'."""
    df = newest_per_cell(store.load_runs(results_dir))
    if df.empty or scale not in df.columns:
        return pd.DataFrame()
    df = df[(df["model"] == model) & df[scale].notna()].copy()
    df["scale"] = df[scale].astype(float)
    for _, r in df.iterrows():
        m = json.loads(r["metrics"]) if isinstance(r["metrics"], str) else (r["metrics"] or {})
        for k in (*METRICS, *(f"{c}_se" for c in METRICS)):
            df.loc[_, k] = m.get(k)
    df["solver_name"] = [solver_label(r) for _, r in df.iterrows()]
    return df


def table(df: pd.DataFrame) -> str:
    """Markdown: one line per (solver, NFE), one column per guidance scale; cells 'FID / acc / trunc'."""
    scales = sorted(df["scale"].unique())
    head = "| solver | NFE | " + " | ".join(f"s = {s:g}" for s in scales) + " |"
    lines = [head, "|" + "---|" * (2 + len(scales))]
    for (solver, nfe), g in df.groupby(["solver_name", "nfe_budget"]):
        cells = []
        for s in scales:
            r = g[g["scale"] == s]
            if r.empty:
                cells.append("")
                continue
            r = r.iloc[0]
            if r["status"] != "ok":
                cells.append(r["status"])
                continue
            cells.append(f"{r['fid']:.2f} / {r['label_acc']:.3f} / {r['trunc_rms']:.3f}")
        lines.append(f"| {solver} | {int(nfe)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(df: pd.DataFrame, path: Path, n_samples: int | None = None, title: str | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = all_columns()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(13, 4.2))
    styles = {10: "o-", 20: "s--"}
    for ax, m in zip(axes, METRICS):
        for i, ((solver, nfe), g) in enumerate(df.groupby(["solver_name", "nfe_budget"])):
            g = g[g["status"] == "ok"].sort_values("scale")
            se = pd.to_numeric(g[f"{m}_se"], errors="coerce").fillna(0).to_numpy()
            color = f"C{sorted(df['solver_name'].unique()).index(solver)}"
            ax.errorbar(g["scale"], pd.to_numeric(g[m]), yerr=se, fmt=styles.get(int(nfe), "^:"),
                        color=color, ms=4, capsize=2, label=f"{solver}, NFE {int(nfe)}")
        c = cols[m]
        ax.set_xlabel("guidance scale s")
        ax.set_ylabel(SHORT[m] + (", higher is better" if c.better == "higher" else ", lower is better"), fontsize=9)
        if c.log:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    n_txt = f"n = {n_samples} samples per cell; " if n_samples else ""
    title = title or ("digits_cond: classifier-free guidance sweep ({n}error bars +- 1 standard error; one guided "
                      "evaluation = 1 NFE = 2 network forwards)")
    fig.suptitle(title.format(n=n_txt), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.guidance_sweep", description=__doc__.splitlines()[0])
    ap.add_argument("results_dir")
    ap.add_argument("out", nargs="?", default="results/figures/guidance_sweep.png")
    ap.add_argument("--model", default="digits_cond", help="the model whose rows to plot (default digits_cond)")
    ap.add_argument("--scale", default="guidance_scale", choices=sorted(SCALES),
                    help="the swept scale: guidance_scale (classifier-free) or classifier_scale")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    df = sweep_frame(a.results_dir, a.model, a.scale)
    if df.empty:
        print(f"no {a.model} rows with a {a.scale} in {a.results_dir}", file=sys.stderr)
        return 1
    print(table(df))
    out = Path(a.out)
    ns = df["n_samples"].dropna().unique()
    title = None
    if a.scale == "classifier_scale":
        title = (f"{a.model}: classifier guidance sweep, score + s grad log p_t(y|x) ({{n}}error bars +- 1 standard "
                 f"error; classifier evaluations not counted in NFE)")
    figure(df, out, int(ns[0]) if len(ns) == 1 else None, title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
