"""python -m bench orderings: the published solver orderings (issue 15, item 4), on each solver's preferred grid and on
the grid `optimize-steps` finds for that model, solver and NFE.

    python -m bench orderings results_dir=/tmp/orderings                   # gmm and digits, NFE 4 5 6 8 10 20
    python -m bench orderings results_dir=/tmp/orderings models=gmm nfe=4,6 fine_points=241

For every cell (model, solver, NFE): trunc_rms of `n_samples` samples of `seed` on the solver's default grid, then the
search (bench.optimize_steps.optimize, calibration seed calib_seed, disjoint from seed) and the same metric on its grid;
both are rows of results_dir, and the grid is results_dir/steps/timesteps/MODEL-LABEL-nfeN-METHOD.yaml (kept and reused
on a rerun when its search knobs match).  The search's cost step is DDIM whatever the solver, so searches share their
teacher (cached, see conf/optimize.yaml teacher_cache) where the model, the solver's default spacing and the fine grid
agree: with fine_points fixed, one teacher per (model, spacing).  Prints a markdown table "preferred / optimised
(counted NFE)" and the search cost per distinct teacher.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.models.errors import ConfigError

# (label, solver config): diff-sampler's CIFAR-10 comparison set
SOLVERS = (
    ("Euler", {"name": "euler"}),
    ("Heun", {"name": "heun"}),
    ("DPM-Solver-2", {"name": "dpm_solver", "order": 2}),
    ("DPM-Solver++(3M)", {"name": "dpm_solver_pp", "order": 3}),
    ("UniPC-3", {"name": "unipc", "order": 3}),
    ("DEIS-tAB3", {"name": "deis", "order": 3}),
    ("iPNDM-4", {"name": "ipndm_v"}),
)
NFES = (4, 5, 6, 8, 10, 20)
MODELS = ("gmm", "digits")


def _slug(label: str) -> str:
    import re
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")          # DPM-Solver++(3M) -> dpm_solver_3m


def _metrics(results_dir, row) -> dict:
    """The metrics of a row just run, or of the recorded row when run() skipped the cell as done."""
    if row.get("status") == "skipped":
        from bench import store
        done = store.find_done(results_dir, row["key"])
        m = done.get("metrics") if done else None
        row = {**row, "status": done["status"] if done else "missing", "nfe": done.get("nfe") if done else None,
               "metrics": json.loads(m) if isinstance(m, str) else (m or {})}
    return {"status": row.get("status"), "nfe": row.get("nfe"), **(row.get("metrics") or {})}


def _grid(cfg, knobs, name):
    """The optimised grid's artifact: reused when it exists with the same search knobs, else searched."""
    from bench.optimize_steps import artifact_path, load_artifact, optimize, write_artifact
    path = artifact_path(cfg["results_dir"], name)
    want = {"method": knobs["method"], "calib_seed": knobs["calib_seed"], "n_calib": knobs["n_calib"],
            "fine_points": knobs["fine_points"], "nfe": cfg["nfe"]}
    if path.exists():
        try:
            src = load_artifact(path).get("source") or {}
            if all(src.get(k) == v for k, v in want.items() if v is not None):
                return path, src, False
        except ConfigError:
            pass
    art = optimize(cfg, knobs)
    return write_artifact(cfg["results_dir"], name, art), art["source"], True


def run_table(results_dir, models=MODELS, nfes=NFES, solvers=SOLVERS, n_samples=64, seed=0, knobs=None,
              log=print) -> list[dict]:
    """One dict per cell: model, label, nfe, pref and opt (metrics of each row), search (the grid's source)."""
    from bench.api import config
    from bench.optimize_steps import check_knobs
    from bench.run import run

    k = check_knobs({"method": "gits", **(knobs or {})})
    if k["calib_seed"] == seed:
        raise ConfigError(f"orderings: calib_seed ({k['calib_seed']}) must differ from seed ({seed}): the optimised grids "
                          f"are evaluated on samples disjoint from their calibration set")
    for model in models:                   # unknown model names fail before the first cell
        config(model=model)
    cells = []
    for model in models:
        for label, node in solvers:
            for nfe in nfes:
                cfg = config(model=model, solver=dict(node), nfe=nfe, n_samples=n_samples, batch_size=n_samples,
                             seed=seed, metrics=["trunc"], results_dir=str(results_dir), progress=False,
                             save_samples=0)
                t0 = time.perf_counter()
                pref = _metrics(results_dir, run(cfg))
                path, src, searched = _grid(cfg, k, f"{model}-{_slug(label)}-nfe{nfe}-{k['method']}")
                opt = _metrics(results_dir, run(config(model=model, solver=dict(node), nfe=nfe, n_samples=n_samples,
                                                      batch_size=n_samples, seed=seed, metrics=["trunc"],
                                                      results_dir=str(results_dir), progress=False, save_samples=0,
                                                      timesteps={"name": "explicit", "file": str(path)})))
                cells.append({"model": model, "label": label, "nfe": nfe, "pref": pref, "opt": opt, "search": src,
                              "searched": searched})
                log(f"{model:6s} {label:17s} nfe={nfe:2d}: {pref.get('trunc_rms')!s:.6} / {opt.get('trunc_rms')!s:.6}"
                    f"  ({time.perf_counter() - t0:.1f} s{', searched' if searched else ''})")
    return cells


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def markdown(cells) -> str:
    """The table (preferred / optimised trunc_rms, counted NFE; the best of each grid kind per column in bold) and
    the search cost per distinct teacher."""
    models = list(dict.fromkeys(c["model"] for c in cells))
    labels = list(dict.fromkeys(c["label"] for c in cells))
    nfes = list(dict.fromkeys(c["nfe"] for c in cells))
    at = {(c["model"], c["label"], c["nfe"]): c for c in cells}
    out = ["| model | solver | " + " | ".join(str(n) for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for m in models:
        best = {}
        for n in nfes:
            for kind in ("pref", "opt"):
                vals = [at[m, lab, n][kind].get("trunc_rms") for lab in labels if (m, lab, n) in at]
                vals = [v for v in vals if v is not None]
                best[n, kind] = min(vals) if vals else None
        for lab in labels:
            row = [m, lab]
            for n in nfes:
                c = at.get((m, lab, n))
                if c is None:
                    row.append("")
                    continue
                parts = []
                for kind in ("pref", "opt"):
                    v = c[kind].get("trunc_rms")
                    s = _fmt(v)
                    parts.append(f"**{s}**" if v is not None and v == best[n, kind] else s)
                row.append(f"{parts[0]} / {parts[1]} ({c['opt'].get('nfe')})")
            out.append("| " + " | ".join(row) + " |")
    out += ["", "| model | fine grid (spacing, points) | teacher NFE + eps NFE (x 64 calibration samples) | "
                "teacher wall time when computed | grids found from it | search time per grid (cached teacher, "
                "median) |", "|---|---|---|---|---|---|"]
    teachers = {}
    for c in cells:
        s = c["search"]
        t = s.get("teacher") or {}
        key = (c["model"], s.get("fine_timesteps"), s.get("fine_points"))
        e = teachers.setdefault(key, {"nfe": (t.get("nfe"), t.get("eps_nfe")), "wall": t.get("wall_time_s"),
                                      "n": 0, "cached_wall": []})
        e["n"] += 1
        if t.get("cached"):
            e["cached_wall"].append(s.get("search_wall_time_s"))
    for (m, sp, M), e in teachers.items():
        cw = sorted(w for w in e["cached_wall"] if w is not None)
        med = f"{cw[len(cw) // 2]:.2f} s" if cw else "-"
        out.append(f"| {m} | {sp}, {M} | {e['nfe'][0]} + {e['nfe'][1]} | {e['wall']} s | {e['n']} | {med} |")
    return "\n".join(out)


def main(args=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench orderings", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default="results/orderings", help="where the rows, grids and teacher cache go")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    p.add_argument("--nfe", default=",".join(map(str, NFES)), help="comma-separated NFE budgets")
    p.add_argument("--solvers", default=None, help="comma-separated labels of SOLVERS (default: all)")
    p.add_argument("--n-samples", type=int, default=64, help="samples per cell (trunc_rms over them)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (disjoint from calib_seed)")
    p.add_argument("--fine-points", type=int, default=241, help="optimize-steps fine_points (shared teacher)")
    p.add_argument("--calib-seed", type=int, default=1000, help="optimize-steps calib_seed")
    p.add_argument("--n-calib", type=int, default=64, help="optimize-steps n_calib")
    p.add_argument("--method", default="gits", help="optimize-steps method: gits | lte")
    p.add_argument("--out", default=None, help="also write the markdown here")
    a = p.parse_args(args)
    from bench import fsio
    fsio.check_results_dir(a.results_dir)
    try:
        nfes = [int(v) for v in a.nfe.split(",")]
    except ValueError:
        raise ConfigError(f"orderings: nfe must be comma-separated integers, got {a.nfe!r}") from None
    solvers = SOLVERS
    if a.solvers:
        names = [s.strip() for s in a.solvers.split(",")]
        bad = [s for s in names if s not in dict(SOLVERS)]
        if bad:
            raise ConfigError(f"orderings: unknown solver label(s) {', '.join(bad)}; valid: "
                              f"{', '.join(lab for lab, _ in SOLVERS)}")
        solvers = tuple((lab, node) for lab, node in SOLVERS if lab in names)
    knobs = {"method": a.method, "fine_points": a.fine_points, "calib_seed": a.calib_seed, "n_calib": a.n_calib}
    cells = run_table(a.results_dir, [m.strip() for m in a.models.split(",")], nfes, solvers, a.n_samples, a.seed,
                      knobs)
    md = markdown(cells)
    print(md)
    if a.out:
        fsio.atomic_write_text(Path(a.out), md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
