"""Metric bookkeeping off the defaults: metric sample counts that differ from the run's, two seeds and two sample
counts recorded into ONE results directory (so every cache is shared), and batch sizes and shard counts that do
not divide n_samples.  Every value in the store must equal the one computed independently, on exactly the
samples it claims, from a fresh cache:

- the samples are regenerated with bench.sample (another batch size, no shards) and must equal the saved ones;
- trunc_rms: RMS against our own float64 reference of the probability-flow ODE (torchdiffeq dopri5 at 1e-10, in
  lambda, written here) from the regenerated x_T of the first `trunc.n_samples` samples;
- fid (gmm): our own Frechet distance of the samples' moments to the exact data moments;
- nll: nll_bpd_exact equals our own analytic -log2 p(x)/D on the seed's points, and nll_bpd agrees with it;
- every column equals bench.compute_metrics on the regenerated samples with a fresh results_dir.

Negative controls show the checks have power on these very numbers: the RMS against another seed's reference,
or over other samples than the reference's, is far outside the tolerances used.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import yaml
from torchdiffeq import odeint

import bench
from bench.metrics import cache as metric_cache

NFE = 9                       # heun: 5 grid points
TRUNC_N = 24                  # metric sample counts that differ from every run's n_samples
NLL_POINTS = 12
SAVE = 16                     # samples kept in the row's npz (fewer than every run's n_samples)
CONF = Path(bench.__file__).resolve().parent.parent / "conf" / "metric_cfg" / "default.yaml"

# cells recorded into one results directory: (seed, n_samples, batch_size, num_shards)
CELLS = [
    (0, 40, 7, 3),            # 40 = 13 + 13 + 14 over shards, batches of 7 within each
    (1, 40, 7, 1),
    (0, 30, 40, 1),           # same seed, fewer samples: shares seed 0's trunc reference (same first 24 x_T)
    (1, 20, 6, 4),            # fewer samples than trunc.n_samples: trunc uses all 20
]


def metric_cfg():
    """The YAML's metric knobs with ours on top, per metric (so no YAML knob is lost whatever the API's merge)."""
    with open(CONF) as f:
        base = yaml.safe_load(f)
    base["trunc"].update(n_samples=TRUNC_N, rtol=1e-7, atol=1e-7, profile=True, profile_samples=10)
    base["nll"].update(n_points=NLL_POINTS, batch_size=5)
    return base


def run(seed, n, batch_size, num_shards, results_dir):
    return bench.run_cell(model="gmm", solver="heun", nfe=NFE, n_samples=n, seed=seed, batch_size=batch_size,
                          num_shards=num_shards, metrics=["trunc", "fid", "nll"], results_dir=str(results_dir),
                          metric_cfg=metric_cfg(), save_samples=SAVE, progress=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The four cells run into one directory; returns (results_dir, rows as stored, cache misses per cell)."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("bookkeeping")
    misses = []
    for cell in CELLS:
        before = dict(metric_cache.computed)
        row = run(*cell, d)
        assert row["status"] == "ok", row
        misses.append({k: metric_cache.computed[k] - before.get(k, 0) for k in ("trunc_ref", "trunc_traj", "nll")})
    df = bench.load_runs(str(d))
    assert len(df) == len(CELLS) and df["key"].is_unique
    rows = {}
    for _, r in df.iterrows():
        rows[(int(r["seed"]), int(r["n_samples"]))] = {**json.loads(r["metrics"]), "protocols": json.loads(r["protocols"]),
                                                      "samples_path": r["samples_path"], "nfe": int(r["nfe"])}
    return d, rows, misses


@pytest.fixture(scope="module")
def gmm():
    return bench.load_model("gmm")


@pytest.fixture(scope="module")
def regenerated():
    """Samples regenerated per (seed, n) with another batch size and no shards, float32 as the runs."""
    cache = {}

    def get(seed, n):
        if (seed, n) not in cache:
            cache[(seed, n)] = bench.sample("gmm", "heun", nfe=NFE, n_samples=n, seed=seed, batch_size=11)
        return cache[(seed, n)]
    return get


# ------------------------------------------------------------------------------------------ independent values
def own_reference(model, x_T, t_start, t_end):
    """float64 x0 of the probability-flow ODE from x_T at t_start to t_end, then the x0-prediction there:
    dx/dlambda = (f x + g^2/(2 sigma) eps) / (dlambda/dt), dlambda/dt = -g^2/(2 sigma^2), torchdiffeq dopri5."""
    sch, net = model.schedule, model.net

    def rhs(lam, x):
        t = sch.t_of_lambda(lam)
        s, g2 = sch.sigma(t), sch.g2(t)
        eps = net(x, t.expand(x.shape[0]))
        return (sch.f(t) * x + g2 / (2 * s) * eps) * (-2 * s ** 2 / g2)

    lam = torch.stack([sch.lambda_(torch.tensor(float(t_start), dtype=torch.float64)),
                       sch.lambda_(torch.tensor(float(t_end), dtype=torch.float64))])
    with torch.no_grad():
        x = odeint(rhs, x_T.double(), lam, rtol=1e-10, atol=1e-10, method="dopri5")[-1]
        t = torch.tensor(float(t_end), dtype=torch.float64)
        return (x - sch.sigma(t) * net(x, t.expand(x.shape[0]))) / sch.alpha(t)


def own_rms(a, b):
    return math.sqrt(float(((a.double() - b.double()) ** 2).mean()))


def own_frechet(x, mu, C):
    x = x.double().numpy()
    m = x.mean(0)
    S = np.cov(x, rowvar=False)
    covmean = scipy.linalg.sqrtm(S @ C.numpy()).real
    return float(((m - mu.numpy()) ** 2).sum() + np.trace(S) + np.trace(C.numpy()) - 2 * np.trace(covmean))


def nll_points(model, seed, n):
    """The points the nll protocol claims: exact data samples from the (seed, POINTS_STREAM) generator."""
    from bench.metrics.nll import POINTS_STREAM
    from bench.solvers.rng import sample_seed
    g = torch.Generator().manual_seed(sample_seed(seed, POINTS_STREAM))
    return model.data.sample(n, generator=g)


_REFS: dict = {}


def reference_for(model, out, n):
    key = (out.cfg["seed"], n)
    if key not in _REFS:
        _REFS[key] = own_reference(model, out.x_T[:n], out.t[0], out.t[-1])
    return _REFS[key]


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("cell", CELLS, ids=[f"seed{s}-n{n}-bs{b}-shards{k}" for s, n, b, k in CELLS])
def test_samples_are_the_ones_the_row_claims(store, regenerated, cell):
    d, rows, _ = store
    seed, n, _, _ = cell
    row = rows[(seed, n)]
    out = regenerated(seed, n)
    assert row["nfe"] == out.nfe
    saved = np.load(Path(d) / row["samples_path"])["samples"]
    assert saved.shape == (SAVE, 4)
    # float32 sampling: another batch size changes the rounding of the network's reductions (a few ulp, grown
    # by the solve to ~1e-5 here); another sample would differ by O(1)
    np.testing.assert_allclose(saved, out.x0[:SAVE].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS, ids=[f"seed{s}-n{n}-bs{b}-shards{k}" for s, n, b, k in CELLS])
def test_trunc_is_against_its_own_reference_on_its_own_samples(store, regenerated, gmm, cell):
    _, rows, _ = store
    seed, n, _, _ = cell
    row, out = rows[(seed, n)], regenerated(seed, n)
    k = min(TRUNC_N, n)
    proto = row["protocols"]["trunc"]
    assert proto["n_samples"] == k and proto["sample_indices"] == f"0..{k - 1}"
    ref = reference_for(gmm, out, k)
    mine = own_rms(out.x0[:k], ref)
    tol = 1e-4 * mine + 1e-6                  # the stored reference is solved at rtol = atol = 1e-7
    assert abs(row["trunc_rms"] - mine) <= tol, (row["trunc_rms"], mine)
    # negative controls: other samples than the reference's, another seed's reference
    shifted = own_rms(out.x0[n - k:n], ref) if n > k else own_rms(out.x0[:k].roll(1, 0), ref)
    assert abs(shifted - mine) > 100 * tol
    other = regenerated(1 - seed, 40)
    assert abs(own_rms(out.x0[:k], reference_for(gmm, other, k)) - mine) > 100 * tol


@pytest.mark.parametrize("cell", CELLS, ids=[f"seed{s}-n{n}-bs{b}-shards{k}" for s, n, b, k in CELLS])
def test_fid_is_of_all_the_run_samples_against_exact_moments(store, regenerated, gmm, cell):
    _, rows, _ = store
    seed, n, _, _ = cell
    row, out = rows[(seed, n)], regenerated(seed, n)
    assert row["protocols"]["fid"]["n_samples"] == n
    mine = own_frechet(out.x0, gmm.data.mean(), gmm.data.cov())
    assert row["fid"] == pytest.approx(mine, rel=1e-4)             # float32 samples of another batch size
    assert abs(own_frechet(out.x0[: n // 2], gmm.data.mean(), gmm.data.cov()) - mine) > 1e-3


@pytest.mark.parametrize("cell", CELLS, ids=[f"seed{s}-n{n}-bs{b}-shards{k}" for s, n, b, k in CELLS])
def test_nll_is_on_the_points_of_its_own_seed(store, gmm, cell):
    _, rows, _ = store
    seed, n, _, _ = cell
    row = rows[(seed, n)]
    proto = row["protocols"]["nll"]
    assert proto["n_points"] == NLL_POINTS and proto["seed"] == seed and proto["points"] == "exact_data_samples"
    x = nll_points(gmm, seed, NLL_POINTS)
    exact = float((-gmm.data.log_prob(x) / (4 * math.log(2))).mean())
    assert row["nll_bpd_exact"] == pytest.approx(exact, rel=1e-12)
    assert abs(row["nll_bpd"] - exact) < 5e-3                       # the ODE value on the same points
    other = float((-gmm.data.log_prob(nll_points(gmm, 1 - seed, NLL_POINTS)) / (4 * math.log(2))).mean())
    assert abs(other - exact) > 0.02                                # another seed's points are told apart


@pytest.mark.parametrize("cell", CELLS, ids=[f"seed{s}-n{n}-bs{b}-shards{k}" for s, n, b, k in CELLS])
def test_every_column_equals_a_fresh_computation(store, regenerated, tmp_path, cell):
    _, rows, _ = store
    seed, n, _, _ = cell
    row, out = rows[(seed, n)], regenerated(seed, n)
    fresh = bench.compute_metrics(out, ["trunc", "fid", "nll"], results_dir=str(tmp_path / "fresh"), **metric_cfg())
    assert set(fresh) <= set(row), set(fresh) - set(row)
    for k, v in fresh.items():
        if k in ("trunc_ref_nfe", "nll_nfe"):
            continue                                  # adaptive solves: counts depend on the batch they ran in
        if isinstance(v, list):
            np.testing.assert_allclose(row[k], v, rtol=1e-3, atol=1e-6, err_msg=k)
        elif isinstance(v, float) and math.isfinite(v):
            assert row[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
        else:
            assert row[k] == v, k


def test_caches_are_shared_only_where_the_inputs_agree(store):
    """Seed 0 with 30 samples reuses the trunc reference of seed 0 with 40 (same first 24 x_T) and its check solve
    (the first 16, 10x tighter); seed 1 with 20 samples solves its own 20-sample reference but reuses seed 1's check
    solve of the same 16 x_T; the first cell of each seed solves both; NLL depends on the seed only."""
    _, _, misses = store
    assert [m["trunc_ref"] for m in misses] == [2, 2, 0, 1]
    assert [m["nll"] for m in misses] == [1, 1, 0, 0]


def test_metric_cfg_dict_keeps_the_yaml_knobs_it_does_not_name():
    """A dict given for a group merges into its YAML at every depth, like metric_cfg.trunc.n_samples=24 would."""
    with open(CONF) as f:
        yaml_trunc = yaml.safe_load(f)["trunc"]
    cfg = bench.config(model="gmm", metric_cfg={"trunc": {"n_samples": 24}})
    assert cfg["metric_cfg"]["trunc"] == {**yaml_trunc, "n_samples": 24}
