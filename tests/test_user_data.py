"""Real data and FID feature networks of user models (model=custom, model=hf_ddpm; models/user_data.py).

Every model here is built from files the test writes into tmp_path.  The checks are independent of the code under
test: the data read back equal the test's own arrays mapped by hand; FID equals the closed-form Frechet distance
of features the test computes itself (numpy + scipy's sqrtm); NLL of a custom model equals the NLL of the same
network and data held in memory (metric_helpers.tiny_image_model); the shipped digits UNet, data and classifier
loaded as `custom` give model=digits's FID and NLL on the same points, to the last bit.
"""
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from bench.metrics import cache, make_metric
from bench.models import datasets
from bench.models.errors import ConfigError
from bench.models.gmm import GaussianMixture
from bench.models.registry import MODELS, load_model
from bench.models.schedules import make_schedule
from metric_helpers import FlatEps, make_ctx, tiny_image_model

SHAPE = (1, 2, 2)


# --- the user's code: an eps-network and a feature network, by import path ----------------------------------
def tiny_gmm():
    """The Gaussian of metric_helpers.tiny_image_model (mean 0, covariance 0.15 I on 4 dimensions)."""
    return GaussianMixture([1.0], [[0.0] * 4], [(0.15 * torch.eye(4)).tolist()])


def make_gmm_eps():
    """The exact eps of tiny_gmm under vp_linear, as a user's factory (the network of tiny_image_model)."""
    return FlatEps(tiny_gmm(), make_schedule("vp_linear"))


class ZeroEps(nn.Module):
    """eps = 0, for tests that only read data."""

    def forward(self, x, t):
        return torch.zeros_like(x)


class TinyFeatures(nn.Module):
    """tanh(W x + b), a feature network with weights from a file."""

    def __init__(self, d_in: int = 4, d_out: int = 3):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.tanh(self.lin(x.flatten(1)))

    def twice(self, x):
        return 2 * self.forward(x)


# --- helpers ----------------------------------------------------------------------------------------------
def tiny_levels():
    """The level indices 0..16 of tiny_image_model's train and test data (its real_data, mapped back)."""
    model, _ = tiny_image_model()
    return [torch.round((model.real_data(s).double() + 1) / 2 * 16).numpy() for s in ("train", "test")], model


def feature_weights(tmp_path):
    g = torch.Generator().manual_seed(3)
    state = {"lin.weight": torch.randn(3, 4, generator=g), "lin.bias": 0.1 * torch.randn(3, generator=g)}
    path = tmp_path / "features.pt"
    torch.save(state, path)
    return path, state


def custom_cfg(**over):
    cfg = {"name": "custom", "factory": f"{__name__}:make_gmm_eps", "shape": list(SHAPE),
           "schedule": {"name": "vp_linear"}, "data_range": [-1, 1], "n_levels": 17}
    cfg.update(over)
    return cfg


def load_fresh(cfg):
    """The loader called directly (no per-process cache): a new model whose data have not been read."""
    import bench.models.all  # noqa: F401  (registers every loader)
    return MODELS[cfg["name"]](cfg)


def frechet_np(f1, f2):
    """Closed-form Frechet distance of two feature sets (Heusel et al. 2017, eq. 6), numpy + scipy.sqrtm."""
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def feats_np(x, state):
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return np.tanh(x @ state["lin.weight"].double().numpy().T + state["lin.bias"].double().numpy())


# --- reading and mapping -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_npz_split_and_map_equal_the_shipped_digits(tmp_path):
    """sklearn's digits saved as raw 0..16 values, range [0, 16], 17 levels, split 0.2 with seed 0 (the defaults):
    model space and train/test split equal datasets.digits bit for bit."""
    from sklearn.datasets import load_digits

    np.savez(tmp_path / "digits.npz", images=load_digits().images[:, None])
    m = load_fresh(custom_cfg(shape=[1, 8, 8], factory=f"{__name__}:ZeroEps", n_levels=17,
                              real_data={"path": str(tmp_path / "digits.npz"), "range": [0, 16]}))
    for split in ("train", "test"):
        assert torch.equal(m.real_data(split), datasets.digits(split))
    assert m.n_levels == 17 and m.data_range == (-1.0, 1.0)
    # another seed is another split, and another cache key
    m2 = load_fresh(custom_cfg(shape=[1, 8, 8], factory=f"{__name__}:ZeroEps",
                               real_data={"path": str(tmp_path / "digits.npz"), "range": [0, 16], "split_seed": 1}))
    assert m2.dataset_id != m.dataset_id and not torch.equal(m2.real_data("test"), m.real_data("test"))
    assert m2.real_data("test").shape == m.real_data("test").shape


def test_pt_dict_key_and_separate_test_file(tmp_path):
    (tr, te), _ = tiny_levels()
    torch.save({"x": torch.tensor(tr / 16), "labels": torch.zeros(len(tr))}, tmp_path / "train.pt")
    torch.save(torch.tensor(te / 16), tmp_path / "test.pt")
    m = load_fresh(custom_cfg(real_data={"path": str(tmp_path / "train.pt"), "key": "x", "range": [0, 1]}))
    x = torch.tensor(2 * tr / 16 - 1, dtype=torch.float32)
    assert torch.equal(m.real_data("all"), x) and torch.equal(m.real_data("test"), x[datasets._split(len(x), "test")])
    with pytest.raises(ConfigError, match="holds one tensor, not a dict"):   # the key names the array in both files
        load_fresh(custom_cfg(real_data={"path": str(tmp_path / "train.pt"), "key": "x", "range": [0, 1],
                                         "test_path": str(tmp_path / "test.pt")}))
    m = load_fresh(custom_cfg(real_data={"path": str(tmp_path / "test.pt"), "range": [0, 1],
                                         "test_path": str(tmp_path / "test.pt")}))
    assert torch.equal(m.real_data("train"), torch.tensor(2 * te / 16 - 1, dtype=torch.float32))
    with pytest.raises(ConfigError, match=r"holds 2 arrays \(labels, x\); name the one to use with real_data.key"):
        load_fresh(custom_cfg(real_data={"path": str(tmp_path / "train.pt"), "range": [0, 1]}))


@pytest.mark.parametrize("channels", [1, 3])
def test_png_folder_is_read_in_name_order_as_8bit(tmp_path, channels):
    from PIL import Image

    rs = np.random.default_rng(0)
    a = rs.integers(0, 256, size=(12, 4, 5, channels), dtype=np.uint8)
    folder = tmp_path / "imgs"
    (folder / "b").mkdir(parents=True)
    for i in range(12):            # a subfolder and unpadded names: order is by relative path
        sub = folder / "b" if i % 2 else folder
        Image.fromarray(a[i, ..., 0] if channels == 1 else a[i]).save(sub / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    order = sorted(range(12), key=lambda i: f"b/img{i}.png" if i % 2 else f"img{i}.png")
    m = load_fresh(custom_cfg(factory=f"{__name__}:ZeroEps", shape=[channels, 4, 5], data_range=[0, 1], n_levels=None,
                              real_data={"path": str(folder), "test_fraction": 0.25}))
    assert m.n_levels == 256
    full = torch.tensor(a[order].transpose(0, 3, 1, 2) / 255.0, dtype=torch.float32)
    assert torch.allclose(m.real_data("all"), full, atol=1e-7)
    assert torch.equal(m.real_data("test"), m.real_data("all")[torch.from_numpy(datasets._split(12, "test", 0.25, 0))])
    # a grey image among RGB ones: a clear error when read
    if channels == 3:
        Image.fromarray(a[0, ..., 0]).save(folder / "zz.png")
        m = load_fresh(custom_cfg(factory=f"{__name__}:ZeroEps", shape=[3, 4, 5], data_range=[0, 1],
                                  real_data={"path": str(folder)}))
        with pytest.raises(ConfigError, match=r"zz.png' has shape \(1, 4, 5\)"):
            m.real_data("train")


def test_dataset_id_follows_the_file(tmp_path):
    (tr, _), _ = tiny_levels()
    path = tmp_path / "d.npz"
    np.savez(path, x=tr)
    cfg = custom_cfg(real_data={"path": str(path), "range": [0, 16]})
    id1 = load_fresh(cfg).dataset_id
    assert load_fresh(cfg).dataset_id == id1
    assert load_fresh({**cfg, "dataset_id": "mine"}).dataset_id == "mine:" + id1.split(":", 1)[1]
    np.savez(path, x=tr[::-1])                         # rewritten (new mtime): a new key
    assert load_fresh(cfg).dataset_id != id1
    assert load_fresh(custom_cfg(data_range=[0, 1], real_data={"path": str(path), "range": [0, 16]})).dataset_id \
        != load_fresh(cfg).dataset_id                  # another map into model space: another key


# --- FID -------------------------------------------------------------------------------------------------
def test_fid_with_a_user_feature_net_is_the_closed_form_and_cached(tmp_path):
    (tr, te), _ = tiny_levels()
    np.savez(tmp_path / "train.npz", x=tr)
    np.savez(tmp_path / "test.npz", x=te)
    wpath, state = feature_weights(tmp_path)
    cfg = custom_cfg(real_data={"path": str(tmp_path / "train.npz"), "test_path": str(tmp_path / "test.npz"),
                                "range": [0, 16]},
                     feature_net={"factory": f"{__name__}:TinyFeatures", "kwargs": {"d_out": 3}, "weights": str(wpath)})
    m = load_fresh(cfg)
    x_tr, x_te = 2 * tr / 16 - 1, 2 * te / 16 - 1           # model space, by hand
    f_tr, f_te = feats_np(x_tr, state), feats_np(x_te, state)
    fid = make_metric("fid", {"real_split": "train"})
    same = fid.compute(make_ctx(m, m.real_data("train"), tmp_path))
    assert abs(same["fid"]) < 1e-6 * frechet_np(f_tr, f_te)      # equal sets: ~0
    assert same["fid_real_test"] == pytest.approx(frechet_np(f_tr, f_te), rel=1e-4)
    shifted = torch.tensor(x_te + 0.3, dtype=torch.float32)
    out = fid.compute(make_ctx(m, shifted, tmp_path))
    assert out["fid"] == pytest.approx(frechet_np(f_tr, feats_np(x_te + 0.3, state)), rel=1e-4)
    assert out["fid"] > 3 * same["fid_real_test"]
    # a fresh model on the same files: statistics from the cache, the files not even read
    before = cache.computed["fid_ref"]
    m2 = load_fresh(cfg)
    out2 = make_metric("fid", {"real_split": "train"}).compute(make_ctx(m2, shifted, tmp_path))
    assert out2["fid"] == out["fid"] and cache.computed["fid_ref"] == before and not m2.real_data._memo
    # feature_net.method: another method of the same network is another feature space
    m3 = load_fresh({**cfg, "feature_net": {**cfg["feature_net"], "method": "twice"}})
    out3 = make_metric("fid", {"real_split": "train"}).compute(make_ctx(m3, shifted, tmp_path))
    assert out3["fid"] == pytest.approx(frechet_np(2 * f_tr, 2 * feats_np(x_te + 0.3, state)), rel=1e-4)


def test_rgb_model_without_feature_net_names_what_inception_needs(tmp_path):
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity installed: tests/test_fid.py runs Inception from a local file")
    except ImportError:
        pass
    np.savez(tmp_path / "rgb.npz", x=np.random.default_rng(0).integers(0, 256, (10, 3, 4, 4)).astype(np.uint8))
    m = load_fresh(custom_cfg(factory=f"{__name__}:ZeroEps", shape=[3, 4, 4], n_levels=256,
                              real_data={"path": str(tmp_path / "rgb.npz"), "range": [0, 255]}))
    with pytest.raises(ConfigError, match=r"torch-fidelity.*pip install -e '.\[inception\]'.*inception_weights.*"
                                          r"model.feature_net"):
        make_metric("fid", {}).compute(make_ctx(m, m.real_data("test"), tmp_path))


# --- NLL -------------------------------------------------------------------------------------------------
def test_nll_of_custom_model_equals_the_same_model_in_memory(tmp_path):
    """The network and data of tiny_image_model, written to files and loaded as model=custom: the same
    dequantised bits/dim (same points, same draws) as the in-memory model through the existing nll path."""
    (tr, te), ref = tiny_levels()
    np.savez(tmp_path / "train.npz", x=tr)
    np.savez(tmp_path / "test.npz", x=te.astype(np.uint8))       # integer storage maps the same
    m = load_fresh(custom_cfg(real_data={"path": str(tmp_path / "train.npz"), "test_path": str(tmp_path / "test.npz"),
                                         "range": [0, 16]}))
    assert torch.equal(m.real_data("test"), ref.real_data("test"))
    knobs = {"solver": "heun", "nfe": 40, "n_points": 32, "divergence": "exact"}
    mine = make_metric("nll", knobs).compute(make_ctx(m, torch.zeros(2, *SHAPE), tmp_path / "a",
                                                      cfg_model={"name": "custom"}))
    theirs = make_metric("nll", knobs).compute(make_ctx(ref, torch.zeros(2, *SHAPE), tmp_path / "b"))
    assert mine["nll_bpd"] == pytest.approx(theirs["nll_bpd"], rel=1e-12, abs=1e-12)
    assert mine["nll_bpd_se"] == pytest.approx(theirs["nll_bpd_se"], rel=1e-12)
    # and it is the dequantised NLL in bits of the 17-level data: about the Gaussian's own -log2 density at the
    # same points plus log2(L / (hi - lo)) per dimension (3.79 here), within the Monte-Carlo error of the draws
    assert "17-level data" in mine["nll_what"]
    x = torch.tensor(2 * te / 16 - 1).flatten(1)[:32]
    approx = -float(tiny_gmm().log_prob(x).mean()) / (4 * math.log(2)) + math.log2(17 / 2)
    assert abs(mine["nll_bpd"] - approx) < 3 * mine["nll_bpd_se"]


@pytest.mark.slow
def test_toy2d_as_custom_equals_model_toy2d(tmp_path):
    """Unbounded vector data (data_range null: used as stored, identity FID features, continuous NLL): the two-moons
    MLP and its data as an .npz, declared as a user's model, give model=toy2d's FID and NLL."""
    import yaml

    torch.save(datasets.toy2d("all"), tmp_path / "moons.pt")
    cfg = {"name": "custom", "factory": "bench.models.unet:MLPEps", "shape": [2],
           "kwargs": {"dim": 2, "hidden": 256, "depth": 4, "t_dim": 64}, "weights": "models/weights/toy2d_mlp.pt",
           "schedule": {"name": "vp_linear", "beta_min": 0.1, "beta_max": 20.0}, "real_data": {"path": str(tmp_path / "moons.pt")}}
    mine = load_fresh(cfg)
    with open("conf/model/toy2d.yaml") as f:
        theirs = load_model(yaml.safe_load(f))
    assert torch.equal(mine.real_data("test"), theirs.real_data("test")) and mine.n_levels is None
    samples = theirs.real_data("test")[:300] * 1.1
    for name, knobs in (("fid", {}), ("nll", {"solver": "heun", "nfe": 20, "n_points": 16})):
        a = make_metric(name, knobs).compute(make_ctx(mine, samples, tmp_path / "a", cfg_model=cfg))
        b = make_metric(name, knobs).compute(make_ctx(theirs, samples, tmp_path / "b", cfg_model={"name": "toy2d"}))
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(v, rel=1e-9, abs=1e-12) for k, v in b.items()
                                            if isinstance(v, float)), (a, b)
    assert "continuous density" in a["nll_what"]


@pytest.mark.slow
def test_digits_as_custom_equals_model_digits(tmp_path):
    """The shipped digits UNet, its data as an .npz and its classifier's penultimate features, all declared as a
    user's model: FID (reference statistics, floor) and NLL equal model=digits's on the same samples and points."""
    import yaml
    from sklearn.datasets import load_digits

    np.savez(tmp_path / "digits.npz", images=load_digits().images[:, None])
    cfg = custom_cfg(factory="bench.models.unet:UNet", kwargs={"in_ch": 1, "base": 32, "mults": [1, 2], "t_dim": 128},
                     weights="models/weights/digits_unet.pt", shape=[1, 8, 8], n_levels=17,
                     real_data={"path": str(tmp_path / "digits.npz"), "range": [0, 16]},
                     feature_net={"factory": "bench.models.unet:DigitClassifier", "method": "features",
                                  "weights": "models/weights/digits_classifier.pt"},
                     schedule={"name": "vp_linear", "beta_min": 0.1, "beta_max": 20.0, "T": 1.0, "t_min": 0.001})
    mine = load_fresh(cfg)
    with open("conf/model/digits.yaml") as f:
        theirs = load_model(yaml.safe_load(f))
    samples = theirs.real_data("test")[:200] * 0.8
    for name, knobs in (("fid", {}), ("nll", {"solver": "heun", "nfe": 20, "n_points": 8})):
        a = make_metric(name, knobs).compute(make_ctx(mine, samples, tmp_path / "a", cfg_model=cfg))
        b = make_metric(name, knobs).compute(make_ctx(theirs, samples, tmp_path / "b", cfg_model={"name": "digits"}))
        for k, v in b.items():
            if isinstance(v, float):
                assert a[k] == pytest.approx(v, rel=1e-9, abs=1e-12), (name, k, a[k], v)
        assert a.keys() == b.keys()


# --- hf_ddpm ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_hf_ddpm_with_real_data_and_feature_net(tmp_path):
    from test_hf_ddpm import _tiny

    root, _, _ = _tiny(tmp_path, "flat")                     # a 2-channel 8x8 UNet
    rs = np.random.default_rng(1)
    raw = rs.integers(0, 256, size=(40, 2, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=raw)
    wpath, state = feature_weights(tmp_path)
    cfg = {"name": "hf_ddpm", "path": str(root), "n_levels": 256, "data_range": [-1, 1],
           "real_data": {"path": str(tmp_path / "d.npz"), "range": [0, 255], "test_fraction": 0.5},
           "feature_net": {"factory": f"{__name__}:TinyFeatures", "kwargs": {"d_in": 128}}}
    with pytest.raises(ConfigError, match="weights in .* do not fit"):     # a 4-input state for a 128-input net
        load_fresh({**cfg, "feature_net": {**cfg["feature_net"], "weights": str(wpath)}})
    m = load_fresh(cfg)
    assert m.dataset_id.startswith(f"hf:{root}:files-") and m.n_levels == 256
    x = 2 * raw.astype(np.float64) / 255 - 1        # (uint8 arithmetic would wrap)
    idx = datasets._split(40, "train", 0.5, 0)
    assert torch.allclose(m.real_data("train"), torch.tensor(x[idx], dtype=torch.float32), atol=1e-7)
    def f(v):
        with torch.no_grad():
            return m.feature_net.net(torch.as_tensor(v, dtype=torch.float32)).double().numpy()
    out = make_metric("fid", {}).compute(make_ctx(m, m.real_data("test") * 0.5, tmp_path))
    te = x[datasets._split(40, "test", 0.5, 0)]
    assert out["fid"] == pytest.approx(frechet_np(f(x[idx]), f(0.5 * te)), rel=1e-4)
    nll = make_metric("nll", {"solver": "euler", "nfe": 4, "n_points": 4}).compute(
        make_ctx(m, torch.zeros(2, 2, 8, 8), tmp_path, cfg_model=cfg))
    assert "256-level data" in nll["nll_what"] and math.isfinite(nll["nll_bpd"])


# --- bad declarations ------------------------------------------------------------------------------------
def bad_declarations(tmp_path):
    (tr, _), _ = tiny_levels()
    np.savez(tmp_path / "ok.npz", x=tr)
    np.savez(tmp_path / "wide.npz", x=np.zeros((10, 1, 2, 3)))
    np.savez(tmp_path / "two.npz", x=tr, y=tr)
    with open(tmp_path / "objs.npz", "wb") as f:   # an npz whose array needs pickle
        np.savez(f, x=np.array([{"a": 1}] * 4, dtype=object))
    (tmp_path / "d.csv").write_text("1,2\n")
    ok = {"path": str(tmp_path / "ok.npz"), "range": [0, 16]}
    feat = f"{__name__}:TinyFeatures"
    return [
        ({"real_data": {**ok, "path": str(tmp_path / "wide.npz")}},
         r"holds items of shape \(1, 2, 3\) \(10 of them\), but the model's shape is \(1, 2, 2\)"),
        ({"real_data": {**ok, "path": str(tmp_path / "missing.npz")}}, r"'.*missing.npz' not found"),
        ({"real_data": {**ok, "path": str(tmp_path / "d.csv")}}, r"unknown data format '.csv'.*\.npz, \.pt"),
        ({"real_data": {"path": str(tmp_path / "ok.npz")}}, r"real_data.range is missing"),
        ({"n_levels": None, "real_data": ok}, r"n_levels is missing.*256 for 8-bit"),
        ({"data_range": None, "n_levels": None, "real_data": ok}, r"data_range, which is null"),
        ({"real_data": {**ok, "path": str(tmp_path / "two.npz")}}, r"holds 2 arrays \(x, y\)"),
        ({"real_data": {**ok, "key": "z"}}, r"has no array 'z' \(key\); it holds: x"),
        ({"real_data": {**ok, "path": str(tmp_path / "objs.npz")}}, r"holds Python objects .*pickle, refused"),
        ({"real_data": {**ok, "range": [16, 0]}}, r"real_data.range must be \[lo, hi\] with lo < hi"),
        ({"real_data": {**ok, "test_fraction": 1.5}}, r"test_fraction must be in \(0, 1\)"),
        ({"real_data": {**ok, "pth": "x"}}, r"unknown key\(s\) pth\. Valid keys are: path, test_path"),
        ({"feature_net": {"factory": feat}}, r"feature_net is declared but no real_data.path"),
        ({"real_data": ok, "feature_net": {"factory": feat, "method": "nope"}}, r"method 'nope' is not a method"),
        ({"real_data": ok, "feature_net": {"factory": feat, "kwargs": {"d_in": 5}}},
         r"fails on input of the model's shape \(2, 1, 2, 2\)"),
        ({"real_data": ok, "feature_net": {"factory": feat, "kwargs": {"width": 5}}}, r"does not take the keyword"),
    ]


def test_bad_declarations_are_config_errors_at_load(tmp_path):
    for over, msg in bad_declarations(tmp_path):
        with pytest.raises(ConfigError, match=msg):
            load_fresh(custom_cfg(**over))


def test_values_off_range_or_off_levels_are_config_errors_on_read(tmp_path):
    (tr, _), _ = tiny_levels()
    np.savez(tmp_path / "a.npz", x=tr)
    m = load_fresh(custom_cfg(real_data={"path": str(tmp_path / "a.npz"), "range": [0, 8]}))
    with pytest.raises(ConfigError, match=r"outside the declared range \[0, 8\]"):
        m.real_data("test")
    m = load_fresh(custom_cfg(n_levels=5, real_data={"path": str(tmp_path / "a.npz"), "range": [0, 16]}))
    with pytest.raises(ConfigError, match=r"not one of the n_levels=5 levels of \[0, 16\]"):
        m.real_data("train")
    torch.save(torch.tensor([float("nan")] * 16).reshape(4, 1, 2, 2), tmp_path / "nan.pt")
    m = load_fresh(custom_cfg(real_data={"path": str(tmp_path / "nan.pt"), "range": [0, 1], "test_fraction": 0.5}))
    with pytest.raises(ConfigError, match="item 0 has a non-finite value"):
        m.real_data("train")


@pytest.mark.slow
def test_cli_bad_data_records_nothing(tmp_path, monkeypatch):
    from test_faults import n_rows, run_cli

    (tr, _), _ = tiny_levels()
    np.savez(tmp_path / "wide.npz", x=np.zeros((10, 1, 2, 3)))
    np.savez(tmp_path / "a.npz", x=tr)
    res = tmp_path / "res"
    common = ["run", "model=custom", f"model.factory={__name__}:make_gmm_eps", "model.shape=[1,2,2]",
              "model.data_range=[-1,1]", "model.n_levels=17", "n_samples=4", "nfe=2", "solver=euler",
              "metrics=[fid]", f"results_dir={res}", "progress=false", f"model.feature_net.factory={__name__}:TinyFeatures"]
    rc, out, err = run_cli(*common, f"model.real_data.path={tmp_path / 'wide.npz'}", "model.real_data.range=[0,16]")
    assert rc != 0 and "the model's shape is (1, 2, 2)" in out + err and "Traceback" not in out + err
    # out of the declared range: found when first read (after sampling), still an error that records nothing
    rc, out, err = run_cli(*common, f"model.real_data.path={tmp_path / 'a.npz'}", "model.real_data.range=[0,8]")
    assert rc != 0 and "outside the declared range [0, 8]" in out + err and "Traceback" not in out + err
    assert n_rows(res) == 0
    rc, out, err = run_cli(*common, f"model.real_data.path={tmp_path / 'a.npz'}", "model.real_data.range=[0,16]")
    assert rc == 0 and n_rows(res) == 1, out + err
