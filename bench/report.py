"""`python -m bench report`: per model, tables (solvers x NFE) of every metric, quality-vs-NFE plots with fitted
orders, and grids of the saved samples, under results/report/<model>/."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench import CONF_DIR, store
from bench.metrics.columns import all_columns, column_owner
from bench.metrics.trunc import fit_order as trunc_fit_order

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


def _timesteps_label(row) -> str:
    """The row's time steps; an optimised grid (timesteps=explicit with an optimize-steps source) says so."""
    ts = str(row["timesteps"])
    cfg = row.get("config")
    try:
        cfg = json.loads(cfg) if isinstance(cfg, str) else (cfg or {})
    except ValueError:
        cfg = {}
    src = ((cfg.get("timesteps") or {}) if isinstance(cfg, dict) else {}).get("source") or {}
    if ts == "explicit" and isinstance(src, dict) and src.get("method"):
        return f"explicit: {src['method']}-optimised for nfe={src.get('nfe')}, calibration seed {src.get('calib_seed')}"
    return ts


def newest_per_cell(df: pd.DataFrame) -> pd.DataFrame:
    """Finished rows, the newest per cell (`cell` = the identity without the code version: a rerun of the same
    cell replaces it); rows of different seeds or sample counts stay separate rows."""
    df = df[df["status"].isin(store.DONE)].copy()
    if df.empty:
        return df
    df = df.sort_values("id").drop_duplicates("cell", keep="last")
    df["label"] = [solver_label(r) for _, r in df.iterrows()]
    df["label"] = df["label"] + " [" + [_timesteps_label(r) for _, r in df.iterrows()] + "]"
    if "guidance_scale" in df.columns:       # conditional models: each guidance scale is its own line
        df["label"] = df["label"] + [f" s={float(v):g}" if pd.notna(v) else "" for v in df["guidance_scale"]]
    if "classifier_scale" in df.columns:     # classifier guidance: each classifier scale is its own line
        df["label"] = df["label"] + [f" cg={float(v):g}" if pd.notna(v) else "" for v in df["classifier_scale"]]
    return df


def _protocol(row, metric: str) -> dict:
    p = row.get("protocols")
    p = json.loads(p) if isinstance(p, str) else p
    return (p.get(metric) or {}) if isinstance(p, dict) else {}


def _num(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return v


def quality_columns(df: pd.DataFrame) -> list:
    """Declared quality columns (bench.metrics.columns) with a number in at least one of these rows."""
    present = [c for c in all_columns().values() if c.quality and c.name in df.columns
               and pd.to_numeric(df[c.name], errors="coerce").notna().any()]
    return present


def table_groups(df: pd.DataFrame, col) -> list[tuple[dict, pd.DataFrame]]:
    """Split rows into tables that share everything but solver (with knobs and time steps), NFE and seed: the metric's
    protocol, the sample count and the dtype.  Returns [(identity, rows)], largest first."""
    owner = column_owner()[col.name]
    rows = df[pd.to_numeric(df[col.name], errors="coerce").notna() | (df["status"] == "diverged")].copy()
    rows["_protocol"] = [json.dumps(_protocol(r, owner), sort_keys=True) for _, r in rows.iterrows()]
    out = []
    for (proto, n, dtype), g in rows.groupby(["_protocol", "n_samples", "dtype"], sort=False, dropna=False):
        if pd.to_numeric(g[col.name], errors="coerce").notna().any():
            out.append(({"protocol": json.loads(proto), "n_samples": int(n) if pd.notna(n) else None,
                         "dtype": dtype if isinstance(dtype, str) else None, "metric": owner}, g))
    return sorted(out, key=lambda x: -len(x[1]))


def aggregate(g: pd.DataFrame, col) -> pd.DataFrame:
    """One line per (solver label, NFE budget): the value, its standard error and the seeds behind it.  One seed:
    the row's own value and standard error.  Several seeds: the mean over seeds and the standard error of that
    mean from the spread over seeds (sd / sqrt(k)), never the last row.  Diverged rows are counted, not averaged."""
    recs = []
    for (label, nfe_b), c in g.groupby(["label", "nfe_budget"]):
        ok = c[c["status"] == "ok"]
        v = pd.to_numeric(ok[col.name], errors="coerce").dropna()
        k = len(v)
        if k == 0:
            val, se = float("nan"), float("nan")
        elif k == 1:
            val = float(v.iloc[0])
            se = _num(ok.loc[v.index[0]].get(col.se)) if col.se and col.se in ok else float("nan")
        else:
            val, se = float(v.mean()), float(v.std(ddof=1) / math.sqrt(k))
        recs.append({"solver": label, "nfe_budget": int(nfe_b), "nfe": float(pd.to_numeric(c["nfe"]).mean()),
                     "value": val, "se": se, "seeds": k, "diverged": int((c["status"] == "diverged").sum()),
                     "seed_list": ",".join(str(int(x)) for x in sorted(c["seed"].dropna().unique()))})
    return pd.DataFrame(recs)


def local_slopes(nfe, err) -> list[float]:
    """-d log err / d log NFE between successive points."""
    pts = sorted((float(n), float(e)) for n, e in zip(nfe, err) if e and e > 0 and math.isfinite(e))
    return [-(math.log(e2) - math.log(e1)) / (math.log(n2) - math.log(n1))
            for (n1, e1), (n2, e2) in zip(pts, pts[1:]) if n2 > n1]


def order_fit(a: pd.DataFrame, order_range=None) -> dict:
    """Per solver: fitted order over the chosen counted-NFE range (all by default), the range used, and a flag when
    successive local slopes disagree by more than 0.5 (a pre-asymptotic fit)."""
    out = {}
    for label, g in a.groupby("solver"):
        g = g[g["value"].notna() & (g["value"] > 0)]
        if order_range:
            g = g[(g["nfe"] >= order_range[0]) & (g["nfe"] <= order_range[1])]
        if g["nfe"].nunique() < 2:
            continue
        sl = local_slopes(g["nfe"], g["value"])
        out[label] = {"order": fit_order(g["nfe"], g["value"]), "range": (int(g["nfe"].min()), int(g["nfe"].max())),
                      "pre_asymptotic": bool(sl) and (max(sl) - min(sl) > 0.5), "local": sl}
    return out


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}"


def _cell_text(r) -> str:
    if r["seeds"] == 0:
        return "diverged" if r["diverged"] else ""
    txt = _fmt(r["value"]) + (f" ± {r['se']:.2g}" if math.isfinite(r["se"]) else "")
    if r["seeds"] > 1:
        txt += f" ({r['seeds']} seeds)"
    if r["diverged"]:
        txt += f", {r['diverged']} diverged"
    return txt


def table_markdown(a: pd.DataFrame, col, ident: dict, orders: dict) -> str:
    nfes = sorted(a["nfe_budget"].unique())
    head = "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + (" | order |" if orders else " |")
    sep = "|---|" + "---:|" * (len(nfes) + (1 if orders else 0))
    body = []
    for label, g in a.groupby("solver"):
        by = {int(r["nfe_budget"]): _cell_text(r) for _, r in g.iterrows()}
        line = f"| {label} | " + " | ".join(by.get(int(n), "") for n in nfes)
        if orders:
            o = orders.get(label)
            line += " | " + ((f"{o['order']:.2f}" + (" (pre-asymptotic)" if o["pre_asymptotic"] else "")) if o else "")
        body.append(line + " |")
    seeds = sorted({int(x) for sl in a["seed_list"] for x in sl.split(",") if x})
    proto = {k: v for k, v in ident["protocol"].items() if k not in ("metric", "n_samples")}
    own_n = ident["protocol"].get("n_samples")
    n_txt = f"n = {ident['n_samples']} samples" + (f" (this metric uses the first {own_n})"
                                                   if own_n and own_n != ident["n_samples"] else "")
    cap = (f"{col.label}{' [' + col.unit + ']' if col.unit else ''}, {'lower' if col.better == 'lower' else 'higher'} "
           f"is better; value ± standard error ({col.se_how or 'as declared'}; over seeds where several); {n_txt}, dtype {ident['dtype']}, "
           f"seeds {', '.join(map(str, seeds))}")
    if orders:
        rng = sorted({o["range"] for o in orders.values()})
        cap += f"; order = least-squares slope over counted NFE {', '.join(f'{lo}-{hi}' for lo, hi in rng)}"
    if col.what:
        cap += f". {col.what}"
    return "\n".join([cap + ".", "", head, sep, *body, "", f"<sub>protocol: `{json.dumps(proto, sort_keys=True)}`</sub>", ""])


def plot_table(a: pd.DataFrame, col, ident: dict, orders: dict, floor: tuple | None, path: Path, model: str) -> None:
    """Quality against counted NFE with error bars, one line per solver (missing cells skipped, not breaking the
    line); reference slopes NFE^-p, p = 1..4, on error plots; the real-data floor at the matching sample count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(8.6, 4.8))
    for label, g in a.groupby("solver"):
        g = g[g["value"].notna()].sort_values("nfe")
        if g.empty:
            continue
        name = label + (f" (order {orders[label]['order']:.2f}{', pre-asymptotic' if orders[label]['pre_asymptotic'] else ''})"
                        if label in orders else "")
        ax.errorbar(g["nfe"], g["value"], yerr=g["se"].where(np.isfinite(g["se"]), 0), fmt="o-", ms=4, capsize=2,
                    label=name)
    if col.order and len(a):
        ok = a[a["value"] > 0]
        if len(ok):
            n0, v0 = float(ok["nfe"].min()), float(ok.loc[ok["nfe"] == ok["nfe"].min(), "value"].median())
            n1 = float(ok["nfe"].max())
            xs = np.array([n0, n1])
            for p_ in (1, 2, 3, 4):
                ax.plot(xs, v0 * (xs / n0) ** -p_, ls=":", color="0.6", lw=1)
                ax.annotate(f"p={p_}", (n1, v0 * (n1 / n0) ** -p_), fontsize=7, color="0.45")
    if floor is not None:
        ax.axhline(floor[0], color="k", ls="--", lw=1, label=floor[1])
    if col.log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
    nfes, ticks = sorted({int(round(x)) for x in a["nfe"].dropna()}), []
    for n_ in nfes:                                   # readable: no two ticks closer than 15 % (9 and 10, 79 and 80)
        if not ticks or n_ > 1.15 * ticks[-1]:
            ticks.append(n_)
    if ticks:
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE (counted)")
    ax.set_ylabel(col.label + (f" [{col.unit}]" if col.unit else ""))
    ax.set_title(f"{model}: {col.label} against NFE\nn = {ident['n_samples']} samples; error bars ± 1 standard error",
                 fontsize=9)
    if floor is None and col.floors:
        ax.text(0.01, 0.01, "no real-data floor at this sample count", transform=ax.transAxes, fontsize=7,
                color="0.4")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def floor_of(g: pd.DataFrame, col, n: int):
    """(value, label) of the first declared floor measured at sample count n (a floor without a count column was
    measured at the row's own count), or None."""
    for fcol, ncol in col.floors:
        if fcol not in g:
            continue
        m = g if ncol is None else g[pd.to_numeric(g.get(ncol), errors="coerce") == n]
        v = pd.to_numeric(m[fcol], errors="coerce").dropna()
        if len(v):
            return float(v.mean()), f"{all_columns()[fcol].label}, n = {n}"
    return None


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


def report(results_dir="results", out_dir=None, order_range=None) -> list[Path]:
    """Write, per model, one table (CSV + Markdown) and one plot per quality column and table identity (protocol,
    sample count, dtype), and a grid of the saved samples; returns the files written."""
    from bench import fsio

    out_dir = Path(out_dir) if out_dir else Path(results_dir) / "report"
    df = newest_per_cell(store.load_runs(results_dir))
    written = []
    if df.empty:
        return written
    for model, g in df.groupby("model"):
        d = out_dir / fsio.safe_name(model, "model name")
        d.mkdir(parents=True, exist_ok=True)
        md = [f"# {model}: quality against NFE", "",
              f"Tables hold rows that share the metric's protocol, the sample count and the dtype; several seeds of a "
              f"cell are averaged (standard error over seeds). Code: "
              f"{', '.join(sorted(g['code_version'].astype(str).unique()))}.", ""]
        for col in quality_columns(g):
            groups = table_groups(g, col)
            for k, (ident, rows) in enumerate(groups):
                a = aggregate(rows, col)
                orders = order_fit(a, order_range) if col.order else {}
                stem = col.name + (f"_{k + 1}" if len(groups) > 1 else "")
                csv = a.assign(order=[orders.get(s_, {}).get("order", float("nan")) for s_ in a["solver"]])
                fsio.atomic_write_text(d / f"{stem}.csv", csv.to_csv(index=False))
                written.append(d / f"{stem}.csv")
                md += [f"### {col.label} (`{col.name}`)" + (f", table {k + 1} of {len(groups)}" if len(groups) > 1
                                                             else ""), "", table_markdown(a, col, ident, orders)]
                protocol = ident["protocol"]
                if col.nfe_dependent and protocol.get(col.nfe_dependent) != "run":
                    hint = (f"; `metric_cfg.{ident['metric']}.{col.nfe_dependent}=run` makes it the run's own solver"
                            if protocol.get(col.nfe_dependent) != "none" else "")
                    md += [f"(`{col.name}` does not depend on the sampler here ({col.nfe_dependent} = "
                           f"{protocol.get(col.nfe_dependent)}), so it is not plotted against NFE{hint}.)", ""]
                    continue
                plot_table(a, col, ident, orders, floor_of(rows, col, ident["n_samples"]), d / f"{stem}.png", model)
                written.append(d / f"{stem}.png")
                md += [f"![{stem}]({stem}.png)", ""]
        if sample_grid(g, results_dir, d / "samples.png", model):
            written.append(d / "samples.png")
            md += ["### Samples", "", "![samples](samples.png)", ""]
        fsio.atomic_write_text(d / "report.md", "\n".join(md))
        written.append(d / "report.md")
    return written
