import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder: $MTRANK_SHARED_DATA, else ../shared/data beside the repo."""
    path = Path(os.environ.get("MTRANK_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.fail(f"shared data not found at {path}; set MTRANK_SHARED_DATA")
    return path
