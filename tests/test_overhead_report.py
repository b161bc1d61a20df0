"""`python -m bench overhead` (issue 17): the table's arithmetic, its NFE column, the reference rows and bad input."""
import pytest
import torch

from bench import overhead
from bench.models.errors import ConfigError


def _rows(out: str) -> list[list[str]]:
    """Table lines as [solver, net, batch, NFE, ...]: the solver column is 18 characters wide (it may hold a space)."""
    return [[ln[:18].strip(), *ln[18:].split()] for ln in out.splitlines() if ln and not ln.startswith(("#", "solver"))]


def test_measure_arithmetic(monkeypatch):
    """own cost per NFE = (wall - in-network) / NFE, ratio = wall / in-network, passes = own / one pass: medians of
    the repeats, from timings the test sets."""
    timings = iter([{"wall": w, "in_net": i, "nfe": 10} for w, i in
                    [(9.0, 1.0), (1.0, 0.5), (2.0, 1.0), (3.0, 1.0)]])        # warm-up, then 3 repeats
    monkeypatch.setattr(overhead, "_case", lambda cfg, net, device, dtype: (None,) * 3 + (torch.zeros(2, 3),))
    monkeypatch.setattr(overhead, "time_once", lambda case, device: next(timings))
    floor = iter([None, None, 0.25, 4.0, 0.5, 5.0, 0.1, 6.0])              # warm-up pass, randn; then per repeat
    monkeypatch.setattr(overhead, "floor_ops", lambda x, device: {overhead.PASS: lambda: next(floor),
                                                                   overhead.RANDN: lambda: next(floor)})
    cfg = {"device": "cpu", "dtype": "float32", "batch_size": 2}
    rows = overhead.measure({"euler": cfg}, "model", 3)
    solver, one_pass, randn = rows
    assert solver["own_per_nfe_s"] == pytest.approx(0.1)           # median of 0.05, 0.1, 0.2
    assert solver["ratio"] == pytest.approx(2.0)                   # median of 2, 2, 3
    assert solver["wall_s"] == pytest.approx(2.0) and solver["in_net_s"] == pytest.approx(1.0)
    assert one_pass["own_per_nfe_s"] == pytest.approx(0.25) and randn["own_per_nfe_s"] == pytest.approx(5.0)
    assert solver["passes"] == pytest.approx(0.4) and one_pass["passes"] == 1.0 and randn["passes"] == 20.0


def test_report_rows_and_counted_nfe(capsys):
    """On the gmm: every solver's NFE column is its counted NFE at the budget (heun 17 of 18: 2 steps - 1), each batch
    gets both reference rows, and a run with the network is never faster than its network calls."""
    assert overhead.main(["--solvers", "euler,heun,ancestral", "--batch", "4,8", "--repeat", "1", "--net", "null,model",
                          "model=gmm"]) == 0
    rows = _rows(capsys.readouterr().out)
    solvers = [r for r in rows if not r[0].startswith("(")]
    assert {(r[0], r[1], int(r[2])) for r in solvers} == {(s, n, b) for s in ("euler", "heun", "ancestral")
                                                          for n in ("null", "model") for b in (4, 8)}
    assert {r[0]: int(r[3]) for r in solvers} == {"euler": 18, "heun": 17, "ancestral": 18}
    for r in solvers:
        if r[1] == "model":
            assert float(r[7]) >= 1.0                                  # ratio = wall / in-network
    refs = [(r[0], int(r[2])) for r in rows if r[0].startswith("(")]
    assert sorted(refs) == sorted([("(one pass)", b) for b in (4, 8)] * 2 + [("(torch.randn)", b) for b in (4, 8)] * 2)
    for r in rows:
        if r[0] == "(one pass)":
            assert float(r[-1]) == 1.0


@pytest.mark.parametrize("args, words", [
    (["--net", "fast"], ["--net", "null, model"]),
    (["--batch", "16,x"], ["--batch", "positive integers"]),
    (["--batch", "0"], ["--batch", "positive"]),
    (["--repeat", "0"], ["--repeat", "positive"]),
])
def test_bad_input_named_before_work(args, words, capsys):
    with pytest.raises(ConfigError) as e:
        overhead.main(args + ["model=gmm"])
    assert all(w in str(e.value) for w in words)
    assert "solver" not in capsys.readouterr().out                 # no table started


def test_guided_runs_time_the_guidance(tmp_path, monkeypatch, capsys):
    """A guided run is timed as `bench run` builds it: classifier-free guidance calls the conditional network with
    labels (the null network takes them), and classifier guidance's gradient is network time, not the solver's own
    cost: a log-potential that sleeps 3 ms per call puts at least NFE x 3 ms in-network, and own cost stays below it."""
    (tmp_path / "slow_potential.py").write_text(
        "import time\n"
        "def energy(x, t, y):\n"
        "    time.sleep(0.003)\n"
        "    return -(x ** 2).flatten(1).sum(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert overhead.main(["--solvers", "heun", "--batch", "4", "--repeat", "1", "--net", "null", "model=gmm",
                          "classifier_scale=0.5", "classifier=slow_potential:energy"]) == 0
    (row,) = [r for r in _rows(capsys.readouterr().out) if r[0] == "heun"]
    nfe, in_net_ms, own_us = int(row[3]), float(row[5]), float(row[6])
    assert nfe == 17 and in_net_ms >= nfe * 3.0 and own_us < 3000.0
    assert overhead.main(["--solvers", "euler,ancestral", "--batch", "4", "--repeat", "1", "--net", "null,model",
                          "model=gmm", "model.conditional=true", "guidance_scale=2"]) == 0
    rows = [r for r in _rows(capsys.readouterr().out) if not r[0].startswith("(")]
    assert len(rows) == 4 and all(int(r[3]) == 18 for r in rows)
    assert all(float(r[7]) >= 1.0 for r in rows if r[1] == "model")
