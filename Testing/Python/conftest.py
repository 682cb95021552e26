"""Shared test fixtures. Data in ../shared/data is optional: tests that need it skip without it."""
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(os.environ.get("DEEPREG_SHARED_DATA",
                                  Path(__file__).resolve().parents[3] / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA
