import json
import sqlite3

import pytest

from bench.metrics import make_metric
from bench.models.errors import ConfigError
from test_cli import bench


@pytest.mark.slow
def test_all_three_metrics_write_their_columns_and_protocols(tmp_path):
    r = bench("run", "model=gmm", "solver=heun", "nfe=10", "n_samples=64", "metrics=[fid,nll,trunc]",
              "metric_cfg.trunc.profile=true",
              "metric_cfg.nll.n_points=16", f"results_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(tmp_path / "results.sqlite") as con:
        (mets, protos), = con.execute("SELECT metrics, protocols FROM runs").fetchall()
    mets, protos = json.loads(mets), json.loads(protos)
    for col in ("fid", "fid_exact_samples", "nll_bpd", "nll_bpd_se", "nll_bpd_exact", "trunc_rms", "trunc_local_profile"):
        assert col in mets and col in r.stdout
    assert abs(mets["nll_bpd"] - mets["nll_bpd_exact"]) < 0.01
    assert len(mets["trunc_local_profile"]) == 4                  # heun, nfe 10: 5 grid points
    assert protos["nll"]["n_points"] == 16 and protos["trunc"]["n_samples"] == 64 and protos["fid"]["n_samples"] == 64


@pytest.mark.parametrize("name,knobs,needle", [
    ("nll", {"solver": "nope"}, "Valid values are: run, euler"),
    ("nll", {"divergence": "nope"}, "Valid values are: auto, exact, hutchinson"),
    ("nll", {"prior": "nope"}, "Valid values are: schedule, exact"),
    ("fid", {"real_split": "val"}, "real_split must be one of train, test"),
    ("fid", {"inception_weights": "/no/such/file.pth"}, "inception_weights file not found"),
    ("trunc", {"refine": 1}, "refine must be an integer >= 2"),
])
def test_bad_metric_knobs_are_config_errors(name, knobs, needle):
    with pytest.raises(ConfigError, match=needle):
        make_metric(name, knobs)
