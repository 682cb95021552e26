"""The bundled example pair: two brain-like phantoms related by a known smooth deformation,
generated deterministically (seed 0) so nothing has to be downloaded or shipped as data."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np

from ..core.geometry import Grid

#: Size (D, H, W) and spacing (x, y, z) mm of the example: a small head-sized volume.
EXAMPLE_SHAPE = (96, 112, 96)
EXAMPLE_SPACING = (1.8, 1.8, 1.8)
EXAMPLE_FILES = ("fixed.nii.gz", "moving.nii.gz", "fixed_labels.nii.gz", "moving_labels.nii.gz")


def example_grid() -> Grid:
    # An oblique-free LPS head orientation with a realistic, non-zero origin.
    return Grid(EXAMPLE_SHAPE, EXAMPLE_SPACING, (-86.4, -100.8, -86.4), tuple(np.eye(3).ravel()))


def write_example_pair(folder) -> Tuple[Path, Path, Path, Path]:
    """Write the example to ``folder`` (reusing files already there: they are deterministic)."""
    from ..io.images import tensor_to_image, write_image
    from ..train.synth import example_pair
    import torch

    from ..core.errors import BadInputError
    folder = Path(folder)
    paths = tuple(folder / n for n in EXAMPLE_FILES)
    if all(p.is_file() for p in paths):
        return paths
    if folder.exists() and any(folder.iterdir()):
        raise BadInputError(f"{folder} exists and holds other files; the example writes its inputs "
                            "there: move them, or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    pair = example_pair(EXAMPLE_SHAPE, seed=0)
    grid = example_grid()
    write_image(tensor_to_image(pair.fixed, grid), str(paths[0]))
    write_image(tensor_to_image(pair.moving, grid), str(paths[1]))
    write_image(tensor_to_image(pair.fixed_labels.to(torch.int16), grid), str(paths[2]))
    write_image(tensor_to_image(pair.moving_labels.to(torch.int16), grid), str(paths[3]))
    return paths
