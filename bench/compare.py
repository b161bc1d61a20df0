"""Regression check against a baseline: `python -m bench compare --baseline PATH`, and `python -m bench baseline`
which regenerates the committed baseline (results/baseline/<model>.csv) from the sweeps in conf/baseline.yaml.

Cells are matched on `cell` (the cell identity without the code version).  A cell regresses when
  FID          rises by more than tol_fid relative:   (fid - fid_base) / fid_base > tol_fid
  NLL          rises by more than tol_nll bits/dim:    nll_bpd - nll_base > tol_nll
  an error     grows by more than the factor tol_err:  err / err_base > tol_err   (trunc_rms and other *_rms)
or when a cell that finished in the baseline now diverges or fails.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from bench import store
from bench import CONF_DIR, REPO_ROOT

BASELINE_DIR = (REPO_ROOT / "results" / "baseline") if REPO_ROOT else Path("results") / "baseline"


def read_baseline(path) -> pd.DataFrame:
    """A baseline CSV, or every *.csv in a directory."""
    p = Path(path)
    files = sorted(p.glob("*.csv")) if p.is_dir() else [p]
    if not files or not all(f.exists() for f in files):
        from bench.models.errors import ConfigError
        raise ConfigError(f"No baseline CSV at '{path}'. Give a CSV written by `python -m bench export` "
                          f"or a directory of them (e.g. results/baseline).")
    from bench.models.errors import ConfigError
    frames = []
    for f in files:
        try:
            df = pd.read_csv(f)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"baseline CSV '{f}' cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]}).") from None
        need = {"cell", "status", "model", "solver", "nfe_budget", "seed", "n_samples"}
        if not need <= set(df.columns):
            raise ConfigError(f"baseline CSV '{f}' lacks the columns {', '.join(sorted(need - set(df.columns)))}; "
                              f"write it with `python -m bench baseline` or `python -m bench export`.")
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _finished_latest(df: pd.DataFrame) -> pd.DataFrame:
    """The newest row per cell (whole rows: a missing value is not filled from an older row)."""
    df = df[df["status"].isin(list(store.DONE) + ["failed"])]
    if "id" in df:
        df = df.sort_values("id")
    return df.drop_duplicates("cell", keep="last")


def _num(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return v


def regressions(current: pd.DataFrame, baseline: pd.DataFrame, tol_fid=0.1, tol_nll=0.02, tol_err=1.5, z=2.0,
                details: list | None = None):
    """Rows (cell label, metric, baseline, current, why) of every regression, and the number of cells compared.

    Only declared quality columns are judged (bench.metrics.columns), each by its declared change: relative (FID),
    absolute (NLL, bits/dim) or ratio (errors).  A change is a regression when it is worse than the tolerance AND
    significant: (current - baseline) > z * sqrt(se_base^2 + se_current^2) in the worse direction.  Cells are matched
    on their identity, seed and sample count included, so both rows used the same noise and the sampling noise of
    their difference is smaller than this unpaired bound: the test is conservative (it flags only what independent
    noise could not explain).  A row without a standard error is judged by the tolerance alone.  A cell that finished
    in the baseline and now diverges or fails is a regression.  `details` (a list) receives one record per comparison."""
    from bench.metrics.columns import all_columns

    tol = {"fid": tol_fid, "nll": tol_nll, "err": tol_err}
    cols = [c for c in all_columns().values() if c.quality]
    cur, base = _finished_latest(current), _finished_latest(baseline)
    base = base.rename(columns={c: f"{c}_base" for c in base.columns if c != "cell"})
    both = base.merge(cur, on="cell")
    out = []
    for _, r in both.iterrows():
        label = f"{r['model']} {r['solver']} nfe={r['nfe_budget']} seed={r['seed']} n={r['n_samples']}"
        if r["status_base"] in store.DONE and r["status"] not in store.DONE or (
                r["status_base"] == "ok" and r["status"] == "diverged"):
            why = str(r.get("error") or f"step {r.get('diverged_step')}")
            out.append((label, "status", r["status_base"], r["status"], why))
            if details is not None:
                details.append({"cell": label, "column": "status", "baseline": r["status_base"], "current": r["status"],
                                "change": "", "z": float("nan"), "verdict": "REGRESSION"})
            continue
        for col in cols:
            if f"{col.name}_base" not in r.index or col.name not in r.index:
                continue
            b, c = _num(r[f"{col.name}_base"]), _num(r[col.name])
            if math.isnan(b) or math.isnan(c):
                continue
            sb = _num(r.get(f"{col.se}_base")) if col.se else float("nan")
            sc = _num(r.get(col.se)) if col.se else float("nan")
            sign = 1.0 if col.better == "lower" else -1.0
            worse = sign * (c - b)                                     # > 0: worse
            t = tol[col.tol]
            if col.change == "relative":
                exceeds, change = b > 0 and worse / b > t, (f"{(c - b) / b:+.1%}" if b else "")
            elif col.change == "absolute":
                exceeds, change = worse > t, f"{c - b:+.4g} {col.unit}".strip()
            else:
                exceeds = b > 0 and (c / b if sign > 0 else b / c) > t
                change = f"x{c / b:.3g}" if b else ""
            se_d = math.sqrt((sb if math.isfinite(sb) else 0.0) ** 2 + (sc if math.isfinite(sc) else 0.0) ** 2)
            zval = worse / se_d if se_d > 0 else (math.inf if worse > 0 else 0.0)
            significant = zval > z
            verdict = ("REGRESSION" if exceeds and significant else
                       "worse, within noise" if exceeds else "ok")
            if exceeds and significant:
                why = {"relative": f"+{(c - b) / b:.1%} > {t:.0%}", "absolute": f"+{c - b:.4f} {col.unit} > {t}",
                       "ratio": f"x{c / b:.2f} > x{t}"}[col.change]
                out.append((label, col.name, b, c, why + (f", z = {zval:.1f}" if se_d > 0 else ", no s.e.")))
            if details is not None:
                details.append({"cell": label, "column": col.name, "baseline": b, "baseline_se": sb, "current": c,
                                "current_se": sc, "change": change, "z": zval, "verdict": verdict})
    return out, len(both)


def _print_details(details: list) -> None:
    if not details:
        return
    w = max(len(d["cell"]) for d in details)
    print(f"{'cell':<{w}}  {'column':<17} {'baseline':>20} {'current':>20} {'change':>10} {'z':>6}  verdict")
    for d in details:
        def pm(v, se):
            if isinstance(v, str):
                return v
            return f"{v:.4g}" + (f" ± {se:.2g}" if isinstance(se, float) and math.isfinite(se) else "")
        zs = "" if not math.isfinite(d["z"]) else f"{d['z']:.1f}"
        print(f"{d['cell']:<{w}}  {d['column']:<17} {pm(d['baseline'], d.get('baseline_se')):>20} "
              f"{pm(d['current'], d.get('current_se')):>20} {d['change']:>10} {zs:>6}  {d['verdict']}")


def cmd_compare(args) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench compare")
    ap.add_argument("--baseline", required=True, help="baseline CSV, or a directory of them (results/baseline)")
    ap.add_argument("--results-dir", default="results", help="results store to check")
    ap.add_argument("--tol-fid", type=float, default=0.1, help="largest allowed relative FID increase")
    ap.add_argument("--tol-nll", type=float, default=0.02, help="largest allowed NLL increase, bits/dim")
    ap.add_argument("--tol-err", type=float, default=1.5, help="largest allowed error ratio (current / baseline)")
    ap.add_argument("--z", type=float, default=2.0,
                    help="a worse value is a regression only beyond z standard errors of the difference (default 2)")
    ap.add_argument("--require-match", action="store_true", help="(the default) fail when no cell is in both")
    ap.add_argument("--allow-no-match", action="store_true", help="exit 0 when no cell is in both")
    ap.add_argument("--quiet", action="store_true", help="print only regressions, not the table of comparisons")
    a = ap.parse_args(args)
    from bench.models.errors import ConfigError
    try:
        base = read_baseline(a.baseline)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    details = []
    bad, n = regressions(store.load_runs(a.results_dir), base, a.tol_fid, a.tol_nll, a.tol_err, a.z, details)
    if not a.quiet:
        _print_details(details)
    print(f"compared {n} cells present in both {a.results_dir} and {a.baseline} "
          f"({len(details)} values; regression = worse than the tolerance and z > {a.z:g})")
    if n == 0 and not a.allow_no_match:
        print("error: no cell in common with the baseline (same model, solver, knobs, time steps, NFE budget, seed, "
              "sample count, dtype and metric protocol); --allow-no-match to accept that", file=sys.stderr)
        return 1
    for label, col, b, c, why in bad:
        fb = f"{b:.4g}" if isinstance(b, float) else b
        fc = f"{c:.4g}" if isinstance(c, float) else c
        print(f"REGRESSION {label}: {col} {fb} -> {fc} ({why})")
    if bad:
        print(f"{len(bad)} regression(s)")
        return 1
    print("no regression")
    return 0


def baseline_sweeps() -> dict:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "baseline.yaml"), resolve=True)["sweeps"]


def cmd_baseline(args) -> int:
    """Run the sweeps of conf/baseline.yaml into --results-dir, then write <out>/<model>.csv (unless --no-write)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench baseline")
    ap.add_argument("--results-dir", default="results/baseline_run", help="store the baseline runs go to")
    ap.add_argument("--out", default=str(BASELINE_DIR), help="directory of the baseline CSVs")
    ap.add_argument("--no-write", action="store_true", help="only run the sweeps (CI: then compare)")
    ap.add_argument("--models", nargs="*", help="only these models of conf/baseline.yaml")
    a = ap.parse_args(args)
    sweeps = baseline_sweeps()
    env = dict(os.environ)
    if REPO_ROOT:   # a checkout run without installing: the child finds the same bench
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    for model, overrides in sweeps.items():
        if a.models and model not in a.models:
            continue
        cmd = [sys.executable, "-m", "bench", "run", "-m", f"model={model}", *overrides,
               f"results_dir={a.results_dir}", "progress=false"]
        print("+", " ".join(cmd[1:]), flush=True)
        r = subprocess.run(cmd, env=env)
        if r.returncode:
            return r.returncode
    if a.no_write:
        return 0
    df = store.load_runs(a.results_dir)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    keep = ["cell", "key", "status", "model", "solver", "solver_knobs", "timesteps", "nfe_budget", "nfe", "steps",
            "seed", "n_samples", "dtype", "code_version", "id", "error", "diverged_step"]
    for model in sweeps:
        if a.models and model not in a.models:
            continue
        g = df[df["model"] == model].sort_values("id").drop_duplicates("cell", keep="last")   # newest run per cell
        mets = sorted({k for m in g["metrics"].dropna() for k, v in json.loads(m).items()
                       if isinstance(v, (int, float)) or v is None})      # numbers, their standard errors included
        g[[c for c in keep if c in g] + [c for c in mets if c in g]].to_csv(out / f"{model}.csv", index=False)
        print(f"wrote {out / f'{model}.csv'} ({len(g)} cells)")
    return 0


def cmd_export(args) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench export")
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--format", default="csv,parquet", help="csv, parquet or both (comma-separated)")
    ap.add_argument("--out", default=None, help="output path without extension (default results_dir/runs)")
    a = ap.parse_args(args)
    from bench.models.errors import ConfigError
    try:
        for fmt in a.format.split(","):
            path = (a.out + "." + fmt) if a.out else None
            print(f"wrote {store.export(a.results_dir, path, fmt.strip())}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_report(args) -> int:
    import argparse

    from bench.report import report

    ap = argparse.ArgumentParser(prog="python -m bench report")
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--out", default=None, help="default results_dir/report")
    ap.add_argument("--order-range", default=None, metavar="LO:HI",
                    help="fit convergence orders over counted NFE in [LO, HI] (default: every NFE of the table)")
    a = ap.parse_args(args)
    rng = None
    if a.order_range:
        try:
            lo, hi = (float(v) for v in a.order_range.split(":"))
            assert 0 < lo < hi
        except (ValueError, AssertionError):
            print(f"error: --order-range must be LO:HI with 0 < LO < HI, got '{a.order_range}'", file=sys.stderr)
            return 2
        rng = (lo, hi)
    files = report(a.results_dir, a.out, rng)
    if not files:
        print(f"no finished runs in {store.db_path(a.results_dir)}")
        return 1
    for f in files:
        print(f"wrote {f}")
    return 0


def cmd_merge(args) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench merge")
    ap.add_argument("sources", nargs="+", help="results dirs to copy rows from")
    ap.add_argument("--into", default="results", help="results dir that receives the rows")
    a = ap.parse_args(args)
    missing = [s for s in a.sources if not store.db_path(s).exists() and not (Path(s) / store.JOURNAL).is_dir()]
    if missing:
        print(f"error: no results store in {', '.join(missing)} (each source needs a {store.DB_NAME})", file=sys.stderr)
        return 2
    copied, skipped = store.merge(a.into, a.sources)
    print(f"merged into {store.db_path(a.into)}: {copied} rows copied, {skipped} cells already there")
    return 0
