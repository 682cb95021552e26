"""Small helpers shared by the test files."""
import numpy as np
import torch

from deepreglib.core.geometry import Grid, voxel_grid_points


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """A 3x3 rotation from angles (radians) about x, then y, then z: oblique test directions."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# -- physical phantoms for alignment tests (an exact moving image for a known map) ----------
def axis_rotation(axis, degrees):
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def centred_grid(shape, spacing, direction=np.eye(3)):
    """A grid whose centre is the physical origin."""
    g = Grid(shape, spacing, (0.0, 0.0, 0.0), tuple(np.ravel(direction)))
    centre = g.index_to_physical((np.asarray(shape, dtype=np.float64) - 1) / 2.0)
    return Grid(shape, spacing, tuple(-centre), tuple(np.ravel(direction)))


def phantom(points, seed=0):
    """Asymmetric 'head': an ellipsoid body plus 12 random anisotropic blobs (mm, about 0)."""
    rng = np.random.default_rng(seed)
    out = np.exp(-(((points / np.array([30.0, 24.0, 20.0])) ** 2).sum(-1)) ** 2)
    for _ in range(12):
        c = rng.uniform(-22, 22, 3) * np.array([1.0, 0.8, 0.7])
        s = rng.uniform(3, 7, 3)
        out = out + rng.uniform(0.5, 1.5) * np.exp(-0.5 * (((points - c) / s) ** 2).sum(-1))
    return out


def sample_phantom(grid, fixed_to_moving=None):
    """Phantom on ``grid``; with ``fixed_to_moving = A`` it is the moving image of that map."""
    p = voxel_grid_points(grid, torch.float64)[0].permute(1, 2, 3, 0).numpy()
    if fixed_to_moving is not None:
        inv = np.linalg.inv(fixed_to_moving)
        p = p @ inv[:3, :3].T + inv[:3, 3]
    return torch.from_numpy(phantom(p)).float()[None, None]


def corner_error(grid, truth, estimate):
    c = grid.corners()
    a = c @ truth[:3, :3].T + truth[:3, 3]
    b = c @ estimate[:3, :3].T + estimate[:3, 3]
    return float(np.linalg.norm(a - b, axis=1).mean())
