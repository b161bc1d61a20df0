import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def gmm_model():
    from models.registry import load_model
    return load_model({"name": "gmm", "schedule": {"name": "vp_linear"}})
