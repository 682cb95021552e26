"""Shared test fixtures. Data in ../shared/data is optional: tests that need it skip without it."""
import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a loaded 2-core machine spinning threads
# make small torch ops 10-20x slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(os.environ.get("DEEPREG_SHARED_DATA",
                                  Path(__file__).resolve().parents[3] / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    """A training cache of the first 2 ixi_muse subjects of each split at 3 mm (48x64x48), built
    once per test module; skips without the shared data."""
    from deepreglib.train.cache import build_cache
    if not (SHARED_DATA / "ixi_muse").is_dir():
        pytest.skip(f"{SHARED_DATA / 'ixi_muse'} is absent")
    out = tmp_path_factory.mktemp("cache")
    build_cache(SHARED_DATA, out, shape=(48, 64, 48), spacing=3.0, datasets=["ixi_muse"], limit=2,
                log=lambda m: None)
    return out
