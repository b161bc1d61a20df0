import math

import numpy as np
import pytest
import scipy.linalg
import torch

from bench.metrics import cache, make_metric
from bench.metrics.fid import frechet_distance, moments
from metric_helpers import make_ctx, tiny_image_model


def test_frechet_closed_form_matches_hand_computation():
    # diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    mu1, mu2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0])
    a, b = torch.tensor([4.0, 1.0]), torch.tensor([1.0, 9.0])
    hand = 0.25 + 4.0 + (2 - 1) ** 2 + (1 - 3) ** 2
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(hand, rel=1e-12)
    # non-commuting covariances against scipy's matrix square root
    rs = np.random.default_rng(0)
    A, B = rs.normal(size=(3, 3)), rs.normal(size=(3, 3))
    S1, S2 = A @ A.T + 0.1 * np.eye(3), B @ B.T + 0.1 * np.eye(3)
    ref = np.trace(S1 + S2 - 2 * scipy.linalg.sqrtm(S1 @ S2).real)
    assert frechet_distance(np.zeros(3), S1, np.zeros(3), S2) == pytest.approx(ref, rel=1e-9)


def test_gmm_fid_of_exact_samples_shrinks_with_sample_count(gmm_model, tmp_path):
    fid = make_metric("fid", {})
    means = {}
    for n in (100, 1000, 10000):
        vals = []
        for seed in range(4):
            ctx = make_ctx(gmm_model, torch.zeros(n, 4), tmp_path, seed=seed)
            vals.append(fid.compute(ctx)["fid_exact_samples"])
        means[n] = sum(vals) / len(vals)
    # the plug-in estimator's bias falls like 1/n
    assert means[100] > 4 * means[1000] > 16 * means[10000]


def test_gmm_fid_sees_a_wrong_sampler(gmm_model, tmp_path):
    good = gmm_model.data.sample(2000, generator=torch.Generator().manual_seed(5))
    out_good = make_metric("fid", {}).compute(make_ctx(gmm_model, good, tmp_path))
    out_bad = make_metric("fid", {}).compute(make_ctx(gmm_model, 1.2 * good, tmp_path))
    assert out_good["fid"] < 3 * out_good["fid_exact_samples"] + 0.01
    assert out_bad["fid"] > 10 * out_good["fid"]


def test_feature_net_fid_is_cached_and_matches_hand_features(tmp_path):
    model, _ = tiny_image_model()
    fnet = model.feature_net
    samples = model.real_data("test")[:300] * 0.9
    fid = make_metric("fid", {"real_split": "train"})
    before = cache.computed["fid_ref"]
    v1 = fid.compute(make_ctx(model, samples, tmp_path))["fid"]
    assert cache.computed["fid_ref"] == before + 1
    rows = fnet.rows
    v2 = make_metric("fid", {"real_split": "train"}).compute(make_ctx(model, samples, tmp_path))["fid"]
    assert cache.computed["fid_ref"] == before + 1          # second call: reference statistics from disk
    assert fnet.rows - rows <= 300 + 2                       # only the samples (and a 2-row shape probe) were featurised
    assert v2 == pytest.approx(v1, rel=1e-9)
    with torch.no_grad():
        hand = frechet_distance(*moments(fnet(model.real_data("train"))), *moments(fnet(samples)))
    assert v1 == pytest.approx(hand, rel=1e-4, abs=1e-7)
    # a different reference count is a different protocol and a different cache entry
    p1 = fid.protocol(make_ctx(model, samples, tmp_path))
    p2 = make_metric("fid", {"n_ref": 100}).protocol(make_ctx(model, samples, tmp_path))
    assert p1["ref_stats_id"] != p2["ref_stats_id"] and p1["features"] == p2["features"]


@pytest.mark.slow
def test_inception_fid_from_local_weights_file_offline(tmp_path, monkeypatch):
    tfe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    # random Inception-v3 weights in torch-fidelity's format, made without any download
    with monkeypatch.context() as mp:
        mp.setattr(tfe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tfe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = tfe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception_random.pth"
    torch.save(net.state_dict(), weights)

    def no_download(*a, **k):
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(tfe, "load_state_dict_from_url", no_download)
    model, _ = tiny_image_model(shape=(3, 8, 8), levels=256, n_real=24, feature_net=False)
    knobs = {"inception_weights": str(weights), "real_split": "train"}
    same = make_metric("fid", knobs).compute(make_ctx(model, model.real_data("train"), tmp_path))["fid"]
    noise = make_metric("fid", knobs).compute(make_ctx(model, torch.rand(24, 3, 8, 8) * 2 - 1, tmp_path))["fid"]
    assert math.isfinite(noise) and abs(same) < 1e-3 * noise


def test_real_test_floor_is_the_fid_of_held_out_data_and_cached(tmp_path):
    model, _ = tiny_image_model()
    fnet = model.feature_net
    samples = model.real_data("test")[:300] * 0.9
    out = make_metric("fid", {"real_split": "train"}).compute(make_ctx(model, samples, tmp_path))
    test = model.real_data("test")
    with torch.no_grad():
        hand = frechet_distance(*moments(fnet(model.real_data("train"))), *moments(fnet(test)))
    assert out["fid_real_test"] == pytest.approx(hand, rel=1e-4, abs=1e-7)
    assert out["fid_real_test_n"] == test.shape[0]
    assert out["fid_real_test"] < out["fid"]                 # the real held-out data beat the shrunk 'samples'
    before = cache.computed["fid_floor"]
    make_metric("fid", {"real_split": "train"}).compute(make_ctx(model, samples, tmp_path))
    assert cache.computed["fid_floor"] == before               # second call: the floor comes from disk
