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
    """The value stored under `key`, computing and saving it with compute() on a miss."""
    path = Path(results_dir) / "cache" / kind / f"{key_hash(key)}.pt"
    norm_key = json.loads(json.dumps(key, sort_keys=True, default=str))
    if path.exists():
        entry = torch.load(path, weights_only=False)
        if entry.get("key") == norm_key:
            return entry["value"]
    computed[kind] += 1
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": norm_key, "value": value}, tmp)
    tmp.replace(path)
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
