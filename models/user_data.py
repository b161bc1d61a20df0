"""Real data and FID feature network of a user's model (model=custom, model=hf_ddpm), declared in its YAML.

    real_data:                 conf/model/custom.yaml documents every key
      path: data.npz           a folder of PNG/JPEG images (8-bit L or RGB, searched recursively, sorted by
                               relative path) or a .npz / .pt file holding one array (n, *shape)
      test_path: null          held-out data in the same form; null = hold out test_fraction of `path`
      test_fraction: 0.2       share of `path` held out as 'test', by numpy's default_rng(split_seed).permutation
      split_seed: 0            (the split of the shipped digits and toy2d data, models/datasets.py)
      key: null                the array's name in a .npz / .pt holding several (null = its only array)
      range: null              [lo, hi] of the stored values (images: [0, 255])
    n_levels: 256              levels of the stored values (images: 256); checked against the data
    data_range: [-1, 1]        model space: stored value lo..hi maps linearly onto data_range lo..hi
    feature_net: {factory, kwargs, weights, method}   FID features: an nn.Module factory by import path, a
                               state_dict, and the method giving features (null = forward; e.g. timm's forward_features)

What is checked when the model loads, before any work: the files exist, their format is known, the array (or the
first image) has the model's shape, range and n_levels are declared where the data are mapped into a data_range,
the feature network runs on the model's shape.  The data themselves are read on first use (a cached FID reference
or NLL never reads them) and checked then: every value inside range and on its n_levels levels.
The cache key `dataset_id` is a hash of each file's resolved path, size and modification time (not of its
content, so a large folder costs no read) with the split and the map into model space; editing a file changes its
mtime and so the key.  Nothing is unpickled: .pt with weights_only=True, .npz with allow_pickle=False.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.models import datasets
from bench.models.errors import ConfigError
from bench.models.imports import import_object
from bench.models.netio import load_state, read_checkpoint, resolve_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FILE_KINDS = {".npz": "npz", ".pt": "torch", ".pth": "torch"}
DATA_KEYS = ("path", "test_path", "test_fraction", "split_seed", "key", "range")
FEATURE_KEYS = ("factory", "kwargs", "weights", "method")
IMAGE_MODES = {1: "L", 3: "RGB"}          # channels -> the 8-bit PIL mode read as is (no conversion)
IMAGE_RANGE, IMAGE_LEVELS = (0.0, 255.0), 256
LEVEL_TOL = 1e-3                          # |k - round(k)| allowed of a value's level index k (float-stored data)
CHUNK = 4096                              # rows converted to model space at a time


# --------------------------------------------------------------------------------------------- one source
class Source:
    """A folder of images or a tensor file: its items' shape from headers, its stat, and (on demand) its array."""

    def __init__(self, path, key, what: str):
        self.what, self.key = what, key
        p = resolve_path(path, what)
        if not p.exists():
            raise ConfigError(f"{what}: '{path}' not found (a relative path is taken from the working directory, then "
                              f"from the package root). Give a folder of PNG/JPEG images or a .npz / .pt file.")
        self.path = p
        if p.is_dir():
            self.kind = "images"
            self.files = sorted((f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES),
                                key=lambda f: f.relative_to(p).as_posix())
            if not self.files:
                raise ConfigError(f"{what}: folder '{p}' holds no images ({', '.join(IMAGE_SUFFIXES)}).")
            if key is not None:
                raise ConfigError(f"{what}: 'key' names an array inside a .npz / .pt file; '{p}' is a folder of images.")
            self.n, self.item_shape = len(self.files), self._image_shape(self.files[0])
        elif p.suffix.lower() in FILE_KINDS:
            self.kind, self.files = FILE_KINDS[p.suffix.lower()], [p]
            shape = self._npz_shape() if self.kind == "npz" else tuple(self._torch_array(mmap=True).shape)
            if len(shape) < 1:
                raise ConfigError(f"{what}: the array in '{p}' is a scalar; expected (n, *shape).")
            self.n, self.item_shape = shape[0], tuple(shape[1:])
        else:
            raise ConfigError(f"{what}: unknown data format '{p.suffix or p.name}' of '{p}'. Valid: a folder of "
                              f"{'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} images, or a file "
                              f"{', '.join(FILE_KINDS)}.")

    # --- headers ---------------------------------------------------------------------------------------
    def _pick(self, names, where: str) -> str:
        if self.key is not None:
            if self.key not in names:
                raise ConfigError(f"{self.what}: '{self.path}' has no array '{self.key}' (key); it holds: "
                                  f"{', '.join(sorted(names)) or 'none'}.")
            return self.key
        if len(names) != 1:
            raise ConfigError(f"{self.what}: '{self.path}' holds {len(names)} arrays ({', '.join(sorted(names))}); "
                              f"name the one to use with real_data.key{where}.")
        return next(iter(names))

    def _npz_shape(self) -> tuple:
        """The array's shape from its .npy header inside the zip, without reading the data."""
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                self.key = self._pick(names, "")
                with zf.open(self.key + ".npy") as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
        except (zipfile.BadZipFile, ValueError, OSError) as e:
            raise ConfigError(f"{self.what}: '{self.path}' is corrupt or not an npz file ({type(e).__name__}: {e}).") from None
        if dtype.hasobject:
            raise ConfigError(f"{self.what}: array '{self.key}' in '{self.path}' holds Python objects (reading it needs "
                              f"pickle, refused); store a numeric array.")
        return tuple(shape)

    def _torch_array(self, mmap: bool = False) -> torch.Tensor:
        from bench import fsio

        obj = None
        if mmap:        # shapes without reading the data (the zip format torch.save writes by default)
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # noqa: BLE001  (legacy format or a bad file: the full read below says which)
                obj = None
        if obj is None:
            try:
                obj = fsio.load_torch(self.path, self.what)
            except fsio.UnsafeFile as e:
                raise ConfigError(str(e)) from None
        if torch.is_tensor(obj):
            if self.key is not None:
                raise ConfigError(f"{self.what}: '{self.path}' holds one tensor, not a dict; remove real_data.key.")
            return obj
        if isinstance(obj, dict):
            names = [k for k, v in obj.items() if torch.is_tensor(v)]
            self.key = self._pick(names, "")
            return obj[self.key]
        raise ConfigError(f"{self.what}: '{self.path}' holds a {type(obj).__name__}; expected a tensor (n, *shape) "
                          f"or a dict of tensors.")

    def _image_shape(self, f: Path) -> tuple:
        from PIL import Image

        try:
            with Image.open(f) as im:
                mode, (w, h) = im.mode, im.size
        except Exception as e:  # noqa: BLE001  (PIL raises several types for bad files)
            raise ConfigError(f"{self.what}: '{f}' is not a readable image ({type(e).__name__}: {e}).") from None
        channels = {m: c for c, m in IMAGE_MODES.items()}.get(mode)
        if channels is None:
            raise ConfigError(f"{self.what}: image '{f}' has PIL mode '{mode}'; 8-bit 'L' (grey) or 'RGB' images "
                              f"are read as stored (convert others first, e.g. Image.convert('RGB')).")
        return (channels, h, w)

    # --- identity and data ------------------------------------------------------------------------------
    def stat(self) -> list:
        return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files] + [self.key]

    def read(self) -> np.ndarray:
        """The stored values, (n, *item_shape), in their stored dtype."""
        if self.kind == "npz":
            from bench import fsio
            try:
                return fsio.load_npz(self.path, self.what)[self.key]
            except fsio.UnsafeFile as e:
                raise ConfigError(str(e)) from None
        if self.kind == "torch":
            return self._torch_array().detach().cpu().numpy()
        from PIL import Image

        out = np.empty((self.n, *self.item_shape), dtype=np.uint8)
        for i, f in enumerate(self.files):
            with Image.open(f) as im:
                shape = self._image_shape(f) if i else self.item_shape
                if shape != self.item_shape:
                    raise ConfigError(f"{self.what}: image '{f}' has shape {shape} (C, H, W), but "
                                      f"'{self.files[0]}' has {self.item_shape}; all images must have one shape.")
                a = np.asarray(im)
            out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return out


# ---------------------------------------------------------------------------------------------- real data
class RealData:
    """callable(split) -> float32 tensor (n, *shape) in model space; the files are read once, on first use."""

    def __init__(self, train: Source, test: Source | None, test_fraction: float, split_seed: int,
                 raw_range, n_levels, data_range, what: str):
        self.train, self.test, self.what = train, test, what
        self.test_fraction, self.split_seed = test_fraction, split_seed
        self.raw_range, self.n_levels, self.data_range = raw_range, n_levels, data_range
        self._memo: dict = {}

    def _model_space(self, src: Source) -> torch.Tensor:
        """Stored values -> model space, checking each value is finite, inside range and on a level."""
        raw = src.read()
        out = np.empty(raw.shape, dtype=np.float32)
        for i in range(0, raw.shape[0], CHUNK):
            r = np.asarray(raw[i:i + CHUNK], dtype=np.float64)
            bad = ~np.isfinite(r)
            if bad.any():
                j = int(np.argwhere(bad)[0][0]) + i
                raise ConfigError(f"{self.what}: '{src.path}' item {j} has a non-finite value.")
            if self.data_range is None:          # unbounded data: used as stored
                out[i:i + CHUNK] = r
                continue
            lo, hi = self.raw_range
            tol = 1e-6 * (hi - lo)
            if r.min() < lo - tol or r.max() > hi + tol:
                raise ConfigError(f"{self.what}: '{src.path}' has values in [{r.min():g}, {r.max():g}] (items {i}.."
                                  f"{i + r.shape[0] - 1}), outside the declared range [{lo:g}, {hi:g}] (real_data.range).")
            u = (r - lo) / (hi - lo)             # in [0, 1]
            if self.n_levels is not None:
                k = u * (self.n_levels - 1)
                off = np.abs(k - np.round(k))
                if off.max() > LEVEL_TOL:
                    j = np.unravel_index(int(off.argmax()), off.shape)
                    raise ConfigError(f"{self.what}: '{src.path}' item {j[0] + i} has value {r[j]:g}, not one of the "
                                      f"n_levels={self.n_levels} levels of [{lo:g}, {hi:g}] (lo + k (hi - lo)/(n_levels - 1)); "
                                      f"declare the levels of the stored values (256 for 8-bit) and their range.")
            dlo, dhi = self.data_range
            out[i:i + CHUNK] = dlo + (dhi - dlo) * u
        return torch.from_numpy(out)

    def __call__(self, split: str = "train") -> torch.Tensor:
        if split not in ("train", "test", "all"):
            raise ConfigError(f"Unknown data split '{split}'. Valid splits are: train, test, all.")
        if split not in self._memo:
            if self.test is not None:
                if split == "all":
                    self._memo[split] = torch.cat([self("train"), self("test")])
                else:
                    self._memo[split] = self._model_space(self.train if split == "train" else self.test)
            else:
                if "_full" not in self._memo:
                    self._memo["_full"] = self._model_space(self.train)
                full = self._memo["_full"]
                idx = datasets._split(full.shape[0], split, self.test_fraction, self.split_seed)
                self._memo[split] = full[torch.from_numpy(idx)]
        return self._memo[split]


# ----------------------------------------------------------------------------------------- feature network
class FeatureNet(nn.Module):
    """A user's FID feature network: forward(x) = net(x) flattened to (n, F), in the net's dtype and device."""

    def __init__(self, net: nn.Module, shape: tuple, method: str | None = None, source: str = ""):
        super().__init__()
        self.net, self.shape, self.method, self.source = net, tuple(shape), method, source

    def extra_repr(self) -> str:      # in the FID extractor's cache key beside the weights
        return f"source={self.source}, method={self.method}"

    def forward(self, x):
        p = next(self.net.parameters(), None)
        x = x.detach().reshape(-1, *self.shape)
        if p is not None:
            x = x.to(p.device, p.dtype)
        with torch.no_grad():
            return (getattr(self.net, self.method) if self.method else self.net)(x).flatten(1)


def build_module(fcfg: dict, what: str, example: str) -> nn.Module:
    """factory(**kwargs) by import path, with optional state_dict weights (into net.weights_target if it has one)."""
    factory = import_object(fcfg.get("factory"), f"{what}.factory", example)
    if not callable(factory):
        raise ConfigError(f"{what}.factory '{fcfg.get('factory')}' is not callable.")
    kwargs = fcfg.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{what}.kwargs must be a mapping of keyword arguments of the factory, got {kwargs!r}.")
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{what}: factory '{fcfg.get('factory')}' does not take the keyword arguments {kwargs} "
                          f"({what}.kwargs): {e}") from None
    except ValueError:      # no signature to inspect: the call decides
        pass
    net = factory(**kwargs)
    if not isinstance(net, nn.Module):
        raise ConfigError(f"{what}: factory '{fcfg.get('factory')}' returned {type(net).__name__}, not a torch nn.Module.")
    if fcfg.get("weights"):
        path = resolve_path(fcfg["weights"], what)
        state = read_checkpoint(path, what, "Expected a file written by torch.save(net.state_dict()).")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        load_state(getattr(net, "weights_target", net), state, path, what)
    return net.eval().requires_grad_(False)


def feature_net_from_cfg(fcfg, shape: tuple, what: str):
    """The declared FID feature network, checked on two zero inputs of the model's shape; None if none declared."""
    fcfg = _section(fcfg, FEATURE_KEYS, f"{what}: feature_net")
    if not fcfg.get("factory"):
        if fcfg.get("weights") or fcfg.get("kwargs") or fcfg.get("method"):
            raise ConfigError(f"{what}: feature_net.weights/kwargs/method given without feature_net.factory.")
        return None
    net = build_module(fcfg, f"{what}: feature_net", "my_pkg.nets:make_features")
    method = fcfg.get("method")
    if method is not None and not callable(getattr(net, str(method), None)):
        raise ConfigError(f"{what}: feature_net.method '{method}' is not a method of the network built by "
                          f"'{fcfg['factory']}' ({type(net).__name__}); null calls forward.")
    fnet = FeatureNet(net, shape, method, json.dumps({"factory": fcfg["factory"], "kwargs": fcfg.get("kwargs")},
                                                     sort_keys=True, default=str))
    try:
        f = fnet(torch.zeros(2, *shape))
    except Exception as e:  # noqa: BLE001  (any failure of the user's network on the model's shape)
        raise ConfigError(f"{what}: feature_net '{fcfg['factory']}' fails on input of the model's shape "
                          f"(2, {', '.join(map(str, shape))}): {type(e).__name__}: {e}") from None
    if not torch.is_tensor(f) or f.shape[0] != 2 or f.shape[1] < 1 or not torch.isfinite(f).all():
        raise ConfigError(f"{what}: feature_net '{fcfg['factory']}' must return finite features (n, F) for input "
                          f"(n, {', '.join(map(str, shape))}); got {getattr(f, 'shape', type(f).__name__)}.")
    return fnet


# ------------------------------------------------------------------------------------------- from config
def _section(sec, keys, what: str) -> dict:
    if sec is None:
        return {}
    if not isinstance(sec, dict):
        raise ConfigError(f"{what} must be a mapping with keys {', '.join(keys)}, got {sec!r}.")
    unknown = sorted(set(sec) - set(keys))
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {', '.join(unknown)}. Valid keys are: {', '.join(keys)}.")
    return sec


def _pair(v, what: str):
    if v is None:
        return None
    try:
        lo, hi = (float(a) for a in v)
    except (TypeError, ValueError):
        lo = hi = None
    if isinstance(v, (str, bytes)) or lo is None or not lo < hi:
        raise ConfigError(f"{what} must be [lo, hi] with lo < hi, got {v!r}.")
    return lo, hi


def real_data_from_cfg(cfg: dict, shape: tuple, data_range, n_levels, dataset_id, what: str) -> dict:
    """LoadedModel fields for a user model's declared data: real_data, feature_net, dataset_id, data_range,
    n_levels.  Without real_data.path they are returned unchanged (no data; a feature_net alone is an error)."""
    dcfg = _section(cfg.get("real_data"), DATA_KEYS, f"{what}: real_data")
    fcfg = _section(cfg.get("feature_net"), FEATURE_KEYS, f"{what}: feature_net")
    fields = {"real_data": None, "feature_net": None, "dataset_id": dataset_id, "data_range": data_range,
              "n_levels": n_levels}
    if not dcfg.get("path"):
        if dcfg.get("test_path"):
            raise ConfigError(f"{what}: real_data.test_path given without real_data.path (the training data).")
        if fcfg.get("factory"):
            raise ConfigError(f"{what}: feature_net is declared but no real_data.path; FID needs the real data too.")
        return fields
    shape = tuple(int(s) for s in shape)
    if n_levels is not None and (isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 2):
        raise ConfigError(f"{what}: n_levels must be null or an integer >= 2 (256 for 8-bit data), got {n_levels!r}.")
    train = Source(dcfg["path"], dcfg.get("key"), f"{what}: real_data.path")
    test = Source(dcfg["test_path"], dcfg.get("key"), f"{what}: real_data.test_path") if dcfg.get("test_path") else None
    for name, src in (("path", train), ("test_path", test)):
        if src is not None and src.item_shape != shape:
            raise ConfigError(f"{what}: real_data.{name} '{src.path}' holds items of shape {src.item_shape} "
                              f"({src.n} of them), but the model's shape is {shape}; store the data as (n, "
                              f"{', '.join(map(str, shape))}) (NHWC image arrays: x.transpose(0, 3, 1, 2)).")
    images = train.kind == "images" and (test is None or test.kind == "images")
    raw_range = _pair(dcfg.get("range"), f"{what}: real_data.range")
    if data_range is None:
        if raw_range is not None or n_levels is not None:
            raise ConfigError(f"{what}: real_data.range / n_levels map stored values into the model space "
                              f"data_range, which is null (unbounded data, used as stored); set model.data_range "
                              f"(e.g. [-1, 1]) or leave real_data.range and n_levels null.")
        if images:
            raise ConfigError(f"{what}: images need model.data_range, the model space their [0, 255] maps onto "
                              f"(e.g. [-1, 1] or [0, 1]).")
    else:
        if raw_range is None:
            if not images:
                raise ConfigError(f"{what}: real_data.range is missing: the [lo, hi] of the values stored in "
                                  f"'{train.path}' (e.g. [0, 255] or [0, 1]), mapped onto data_range {list(data_range)}.")
            raw_range = IMAGE_RANGE
        if n_levels is None:
            if not images:
                raise ConfigError(f"{what}: n_levels is missing: the number of levels of the stored values "
                                  f"(256 for 8-bit, 17 for sklearn's digits); NLL dequantises with it.")
            n_levels = IMAGE_LEVELS
    frac, seed = dcfg.get("test_fraction", datasets.TEST_FRACTION), dcfg.get("split_seed", datasets.SPLIT_SEED)
    frac = datasets.TEST_FRACTION if frac is None else frac
    seed = datasets.SPLIT_SEED if seed is None else seed
    if test is None:
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
            raise ConfigError(f"{what}: real_data.test_fraction must be in (0, 1), got {frac!r}.")
        n_test = int(round(frac * train.n))
        if n_test < 2 or train.n - n_test < 2:
            raise ConfigError(f"{what}: real_data.test_fraction={frac} of {train.n} items leaves {n_test} test and "
                              f"{train.n - n_test} train items; each split needs at least 2.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{what}: real_data.split_seed must be an integer >= 0, got {seed!r}.")
    ident = {"train": train.stat(), "test": test.stat() if test else None,
             "split": None if test else [frac, seed], "range": raw_range, "n_levels": n_levels,
             "data_range": list(data_range) if data_range else None}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    fields.update(real_data=RealData(train, test, float(frac), int(seed), raw_range, n_levels, data_range, what),
                  feature_net=feature_net_from_cfg(fcfg, shape, what),
                  dataset_id=f"{dataset_id or 'data'}:files-{digest}", n_levels=n_levels)
    return fields
