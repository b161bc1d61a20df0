import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # tiny tensors: extra intra-op threads only add contention


@pytest.fixture(scope="session")
def gmm_model():
    from bench.models.registry import load_model
    return load_model({"name": "gmm", "schedule": {"name": "vp_linear"}})
