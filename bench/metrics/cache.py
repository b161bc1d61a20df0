"""On-disk cache for expensive metric inputs (real-data statistics, float64 references).

An entry lives at <results_dir>/cache/<kind>/<hash of key>.pt and stores its key beside the value, so a
hash collision or a stale file is detected rather than silently reused.  `computed` counts cache misses
per kind in this process (the tests use it to check that a second call does not recompute).
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import torch

computed: Counter = Counter()


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def tensor_hash(x: torch.Tensor) -> str:
    """Content hash of a tensor (its float64 CPU bytes)."""
    return hashlib.sha256(x.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()).hexdigest()[:20]


def cached(results_dir, kind: str, key: dict, compute):
    """The value stored under `key`, computing and saving it with compute() on a miss.  Entries are read with
    weights_only=True (tensors and plain values; a planted pickle is refused) and written atomically under a
    unique temporary name, so parallel workers sharing a cache never see a partial entry; a corrupt or unsafe
    entry is recomputed with a warning."""
    from bench import fsio

    path = Path(results_dir) / "cache" / kind / f"{key_hash(key)}.pt"
    norm_key = json.loads(json.dumps(key, sort_keys=True, default=str))
    if path.exists():
        try:
            entry = fsio.load_torch(path, f"cache entry ({kind})")
            if isinstance(entry, dict) and entry.get("key") == norm_key:
                return entry["value"]
        except fsio.UnsafeFile as e:
            fsio.warn_once(f"cache:{path}", f"{e}; recomputing it")
    computed[kind] += 1
    value = compute()
    fsio.atomic_write(path, lambda f: torch.save({"key": norm_key, "value": value}, f))
    return value


_FINGERPRINTS: dict = {}


def model_fingerprint(model) -> str:
    """Content hash of a model's network weights (once per process), so cached references go stale when
    the weights change even if the config does not; '' for a network without parameters (gmm)."""
    net = model.net
    if id(net) not in _FINGERPRINTS:
        h = hashlib.sha256()
        for name, v in sorted(getattr(net, "state_dict", dict)().items()):
            if torch.is_tensor(v):
                h.update(name.encode())
                h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        _FINGERPRINTS[id(net)] = (net, h.hexdigest()[:20])
    return _FINGERPRINTS[id(net)][1]
