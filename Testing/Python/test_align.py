"""align.py: initial alignment recovers known transforms between synthetic volumes.

The phantom is a function of physical position, so the moving image is sampled exactly (no
interpolation) as ``moving(q) = phantom(A^-1 q)``; the fixed -> moving map is then ``A`` itself.
Errors are the mean distance over the fixed grid's 8 corners between ``A c`` and ``A_est c``.
"""
import numpy as np
import pytest
import torch

from deepreglib.classic.align import affine_register, center_of_mass_transform, moments_transform
from deepreglib.classic.initial import INITIALIZERS, initial_transform, register_initializer
from deepreglib.core.errors import BadInputError, CancelledError
from deepreglib.core.geometry import Grid, voxel_grid_points  # noqa: F401
from helpers import axis_rotation as _rotation, centred_grid as _centred, corner_error as _corner_error, sample_phantom as _sample  # noqa: E501


FIXED_GRID = _centred((48, 48, 48), (2.0, 2.0, 2.0))
# Another size, spacing and direction, so the test exercises the physical geometry.
MOVING_GRID = _centred((44, 50, 46), (2.2, 2.0, 2.1), _rotation((0, 0, 1), 5))


def _matrix(rotation=np.eye(3), translation=(0.0, 0.0, 0.0)):
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = translation
    return m


TRANSLATION = _matrix(translation=(7.3, -4.1, 5.6))
# 15 degrees + isotropic scale 1.1 + small shear + a 6 mm translation.
AFFINE = _matrix(_rotation((0.3, 0.5, 1.0), 15) @ np.diag([1.1, 1.1, 1.1])
                 @ np.array([[1.0, 0.05, 0.0], [0.0, 1.0, 0.03], [0.02, 0.0, 1.0]]),
                 np.array([1.0, -1.0, 1.0]) * 6.0 / np.sqrt(3.0))
RIGID = _matrix(_rotation((1.0, -0.4, 0.3), 12), (3.0, 4.0, -2.0))


@pytest.fixture(scope="module")
def fixed():
    return _sample(FIXED_GRID)


def test_center_of_mass_recovers_a_translation(fixed):
    moving = _sample(MOVING_GRID, TRANSLATION)
    m = center_of_mass_transform(fixed, FIXED_GRID, moving, MOVING_GRID)
    np.testing.assert_allclose(m[:3, :3], np.eye(3))
    assert np.linalg.norm(m[:3, 3] - TRANSLATION[:3, 3]) < 0.5
    # A dark background offset (CT air) must not pull the centroid: the low percentile is cut.
    m2 = center_of_mass_transform(fixed - 1000, FIXED_GRID, moving - 1000, MOVING_GRID)
    assert np.linalg.norm(m2[:3, 3] - TRANSLATION[:3, 3]) < 0.5


def test_affine_register_recovers_rotation_scale_shear_translation(fixed):
    moving = _sample(MOVING_GRID, AFFINE)
    start = center_of_mass_transform(fixed, FIXED_GRID, moving, MOVING_GRID)
    assert _corner_error(FIXED_GRID, AFFINE, start) > 10  # the problem is not trivial
    m = affine_register(fixed, FIXED_GRID, moving, MOVING_GRID, init=start)
    assert _corner_error(FIXED_GRID, AFFINE, m) < 1.5


def test_rigid_keeps_an_orthonormal_rotation_and_recovers_a_rigid_motion(fixed):
    moving = _sample(MOVING_GRID, RIGID)
    m = affine_register(fixed, FIXED_GRID, moving, MOVING_GRID, rigid=True,
                        levels=(4, 2), iterations=(80, 40))
    r = m[:3, :3]
    np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-9)
    assert abs(np.linalg.det(r) - 1.0) < 1e-9
    assert _corner_error(FIXED_GRID, RIGID, m) < 1.5


def test_moments_recover_a_large_rotation(fixed):
    truth = _matrix(_rotation((0.2, 1.0, 0.4), 70), (5.0, -8.0, 3.0))
    moving = _sample(MOVING_GRID, truth)
    centre_only = center_of_mass_transform(fixed, FIXED_GRID, moving, MOVING_GRID)
    assert _corner_error(FIXED_GRID, truth, centre_only) > 40
    m = moments_transform(fixed, FIXED_GRID, moving, MOVING_GRID)
    assert _corner_error(FIXED_GRID, truth, m) < 2.0


def test_cancel_raises_and_progress_reaches_one(fixed):
    moving = _sample(MOVING_GRID, TRANSLATION)
    calls = []
    with pytest.raises(CancelledError):
        affine_register(fixed, FIXED_GRID, moving, MOVING_GRID, levels=(4,), iterations=(50,),
                        cancel=lambda: calls.append(1) or len(calls) > 3)
    assert len(calls) == 4  # stopped at the first cancel, not at the end

    fractions = []
    affine_register(fixed, FIXED_GRID, moving, MOVING_GRID, levels=(4, 2), iterations=(12, 6),
                    progress=lambda f, msg: fractions.append(f))
    assert len(fractions) > 3
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert fractions[0] < 0.2 and fractions[-1] == 1.0


def test_initial_transform_dispatch(fixed):
    moving = _sample(MOVING_GRID, TRANSLATION)
    np.testing.assert_array_equal(
        initial_transform("none", fixed, FIXED_GRID, moving, MOVING_GRID), np.eye(4))
    np.testing.assert_allclose(
        initial_transform("center", fixed, FIXED_GRID, moving, MOVING_GRID),
        center_of_mass_transform(fixed, FIXED_GRID, moving, MOVING_GRID))
    with pytest.raises(BadInputError, match="--init"):
        initial_transform("learned", fixed, FIXED_GRID, moving, MOVING_GRID)
    seen = {}

    def learned(f, fg, m, mg, device="cpu", **options):
        seen.update(options, device=device)
        return TRANSLATION

    register_initializer("learned-test", learned)
    try:
        out = initial_transform("learned-test", fixed, FIXED_GRID, moving, MOVING_GRID,
                                similarity="mi")
        np.testing.assert_array_equal(out, TRANSLATION)
        assert seen["similarity"] == "mi" and seen["device"] == "cpu"
    finally:
        INITIALIZERS.pop("learned-test")


def test_bad_inputs_raise(fixed):
    with pytest.raises(ValueError, match="does not match its grid"):
        center_of_mass_transform(fixed, FIXED_GRID, fixed, MOVING_GRID)
    with pytest.raises(ValueError, match="same length"):
        affine_register(fixed, FIXED_GRID, fixed, FIXED_GRID, levels=(2, 1), iterations=(5,))
    with pytest.raises(ValueError, match="similarity"):
        affine_register(fixed, FIXED_GRID, fixed, FIXED_GRID, similarity="cc")
    bad = fixed.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(BadInputError, match="NaN"):
        center_of_mass_transform(bad, FIXED_GRID, fixed, FIXED_GRID)
