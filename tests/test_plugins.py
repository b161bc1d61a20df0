"""A researcher's own sampler, run from their own repository without touching this package (issue 9).

The user's project lives in a temporary directory outside this repository and has its own `models/` and
`solvers/` packages (names this suite used to shadow); its sampler is one function plus one YAML in its own
`conf/solver/`, found through Hydra's search path.
"""
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# EDM's Heun written as a user would (alpha, sigma_hat from the schedule): second order, NFE = 2*steps - 1.
USER_SAMPLER = '''
from models.schedules import TAG          # the user's own `models` package, not ours

def my_heun(dyn, x, t, rng=None, extra_eval: bool = False, blend: float = 1.0):
    """EDM Heun in sigma_hat; `blend` < 1 mixes in Euler (a knob); extra_eval spends one undeclared NFE."""
    s = dyn.schedule
    for i in range(len(t) - 1):
        a0, a1 = s.alpha(t[i]), s.alpha(t[i + 1])
        h = s.sigma_hat(t[i + 1]) - s.sigma_hat(t[i])
        xh = x / a0
        d = dyn.eps(x, t[i])
        xe = xh + h * d
        d2 = dyn.eps(xe * a1, t[i + 1])
        x = (xh + h * (blend * 0.5 * (d + d2) + (1 - blend) * d)) * a1
    if extra_eval:
        dyn.eps(x, t[-1])
    return dyn.x0(x, t[-1])
'''
USER_YAML = '''# my sampler: EDM Heun re-implemented in the user's package
name: my_heun
fn: solvers.mine:my_heun
nfe: "2*steps - 1"
order: 2
min_steps: 2
extra_eval: false     # spend one NFE more than declared (for the test)
blend: 1.0            # 1 = Heun
'''

PLUGIN = '''
import bench

@bench.register_solver("plug_ddim", nfe="steps", order=1)
def plug_ddim(dyn, x, t, rng=None, scale: float = 1.0):
    """DDIM = Euler in sigma_hat, registered by decorator from a plugin package."""
    s = dyn.schedule
    for i in range(len(t) - 1):
        x0 = dyn.x0(x, t[i])
        eps = (x - s.alpha(t[i]) * x0) / s.sigma(t[i])
        x = s.alpha(t[i + 1]) * x0 + scale * s.sigma(t[i + 1]) * eps
    return dyn.x0(x, t[-1])
'''


@pytest.fixture(scope="module")
def user_project(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_project")
    (d / "models").mkdir()
    (d / "models" / "__init__.py").write_text("")
    (d / "models" / "schedules.py").write_text("TAG = 'the user models package'\n")   # no NoiseSchedule here
    (d / "solvers").mkdir()
    (d / "solvers" / "__init__.py").write_text("")
    (d / "solvers" / "mine.py").write_text(textwrap.dedent(USER_SAMPLER))
    (d / "conf" / "solver").mkdir(parents=True)
    (d / "conf" / "solver" / "my_heun.yaml").write_text(USER_YAML)
    # a sampler package registering by decorator, found through its entry point (an installed distribution)
    (d / "plug_samplers.py").write_text(textwrap.dedent(PLUGIN))
    dist = d / "plug_samplers-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plug-samplers\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[bench.solvers]\nplug = plug_samplers\n")
    return d


def _bench(project, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _rows(results):
    con = sqlite3.connect(results / "results.sqlite")
    try:
        return con.execute("SELECT solver, nfe_budget, nfe, status, error FROM runs ORDER BY id").fetchall()
    finally:
        con.close()


@pytest.mark.slow
def test_user_sampler_sweep_report_orders(user_project):
    sp = "hydra.searchpath=[file://conf]"                     # relative to the user's directory, as in the README
    res = user_project / "results"
    r = _bench(user_project, "run", "-m", "model=gmm", "solver=my_heun,heun,dpm_solver_pp", "nfe=9,17", sp,
               "n_samples=64", f"results_dir={res}", "progress=false")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(res)
    assert len(rows) == 6 and all(st == "ok" for *_, st, _ in rows), rows
    mine = {b: n for s, b, n, _, _ in rows if s == "my_heun"}
    assert mine == {9: 9, 17: 17}                              # counted NFE = 2*steps - 1 within the budget
    heun = {b: n for s, b, n, _, _ in rows if s == "heun"}
    assert heun == mine
    # same function as EDM Heun on the same noise: the same truncation error
    con = sqlite3.connect(res / "results.sqlite")
    tr = dict(((s, b), m) for s, b, m in con.execute(
        "SELECT solver, nfe_budget, json_extract(metrics, '$.trunc_rms') FROM runs"))
    con.close()
    for b in (9, 17):
        assert tr[("my_heun", b)] == pytest.approx(tr[("heun", b)], rel=1e-4)
    r = _bench(user_project, "report", f"results_dir={res}")
    assert r.returncode == 0, r.stderr[-3000:]
    table = (res / "report" / "gmm" / "report.md").read_text()
    assert "my_heun" in table and "dpm_solver_pp" in table
    r = _bench(user_project, "orders", "--only", "my_heun", "--samples", "16", "--searchpath", "conf")
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("my_heun"))
    theory, fitted = _theory_fitted(line)
    assert theory == 2 and abs(fitted - 2) < 0.2, line


def _theory_fitted(line):
    # "my_heun extra_eval=False blend=1.0   2   2.012  +0.01  ..."
    tokens = line.split()
    i = next(k for k, tok in enumerate(tokens) if tok.replace(".", "").isdigit() and "=" not in tok)
    return int(float(tokens[i])), float(tokens[i + 1])


def test_user_sampler_undeclared_nfe(user_project, tmp_path):
    sp = f"hydra.searchpath=[file://{user_project / 'conf'}]"
    res = tmp_path / "results"
    common = ["model=gmm", "solver=my_heun", "nfe=9", sp, "n_samples=8", "metrics=[]", f"results_dir={res}"]
    r = _bench(user_project, "run", *common, "solver.extra_eval=true")
    assert r.returncode == 1
    (row,) = _rows(res)
    assert row[3] == "failed" and "evaluated the network 10 times, more than the 9 it declares" in row[4]
    assert len(_rows(res)) == 1


def test_user_sampler_bad_knobs(user_project, tmp_path, monkeypatch):
    """The same command line in this process (from the user's directory, their package importable)."""
    from tests.test_faults import run_cli
    monkeypatch.chdir(user_project)
    monkeypatch.syspath_prepend(str(user_project))
    for mod in ("solvers", "solvers.mine", "models", "models.schedules"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    res = tmp_path / "results"
    common = ["model=gmm", "solver=my_heun", "nfe=9", "hydra.searchpath=[file://conf]", "n_samples=8", "metrics=[]",
              f"results_dir={res}"]
    for bad, needle in [("+solver.foo=1", "solver 'my_heun' has no knob 'foo'. Its knobs (with defaults) are: "
                                          "extra_eval=False, blend=1.0"),
                        ("solver.blend=abc", "knob blend='abc' is of type str, but blend takes type float"),
                        ("seed=-1", "seed"), ("seed=abc", "seed")]:
        rc, out, err = run_cli("run", *common, bad)
        assert rc == 2, (bad, out, err[-2000:])
        assert needle in err and "Traceback" not in err, (bad, err[-2000:])
    assert not (res / "results.sqlite").exists() or len(_rows(res)) == 0     # no row for any bad input


def test_unknown_user_solver_names_searchpath(user_project):
    r = _bench(user_project, "run", "model=gmm", "solver=my_heunn", "n_samples=4", "metrics=[]",
               f"hydra.searchpath=[file://{user_project / 'conf'}]")
    assert r.returncode == 2 and "Unknown solver 'my_heunn'" in r.stderr and "my_heun," in r.stderr


def test_nfe_expression_is_arithmetic_only():
    from bench.models.errors import ConfigError
    from bench.solvers.registry import make_spec

    spec = make_spec("x", lambda dyn, x, t, rng, order=2: x, nfe="order*(steps - 1) + 1", order="order + 1")
    assert spec.nfe_of_steps(5, order=3) == 13 and spec.theoretical_order(order=3) == 4
    assert spec.steps_for(13, order=3) == 5
    with pytest.raises(ConfigError, match="not an arithmetic expression"):
        make_spec("x", lambda dyn, x, t, rng: x, nfe="__import__('os').system('true')")
    with pytest.raises(ConfigError, match="uses gamma, which is neither 'steps' nor a knob"):
        make_spec("x", lambda dyn, x, t, rng: x, nfe="gamma*steps").nfe_of_steps(3)


@pytest.mark.slow
def test_plugin_solver_by_entry_point(user_project, tmp_path):
    res = tmp_path / "results"
    r = _bench(user_project, "run", "-m", "model=gmm", "solver=plug_ddim,euler", "nfe=10", "n_samples=32",
               f"results_dir={res}", "progress=false", "metrics=[trunc]")
    assert r.returncode == 0, r.stderr[-3000:]
    con = sqlite3.connect(res / "results.sqlite")
    tr = dict(con.execute("SELECT solver, json_extract(metrics, '$.trunc_rms') FROM runs WHERE status='ok'"))
    knobs = dict(con.execute("SELECT solver, solver_knobs FROM runs"))
    con.close()
    assert set(tr) == {"plug_ddim", "euler"}
    assert tr["plug_ddim"] == pytest.approx(tr["euler"], rel=1e-4)      # DDIM is Euler in sigma_hat
    assert "scale" in knobs["plug_ddim"]                                # its keyword defaults are its config


def test_shell_completion_of_the_console_script(tmp_path, monkeypatch):
    from tests.test_faults import run_cli
    monkeypatch.chdir(tmp_path)

    def q(line):
        monkeypatch.setenv("COMP_LINE", line)
        monkeypatch.setenv("COMP_POINT", str(len(line)))
        return run_cli("-sc", "query=bash")[1].split()
    assert "solver=dpm_solver_pp" in q("bench run solver=dp") and "solver=heun" not in q("bench run solver=dp")
    assert "run" in q("bench r") and "report" in q("bench r")
    inst = run_cli("-sc", "install=bash")[1]
    assert "complete -o nospace -o default -F hydra_bash_completion bench" in inst
