"""The engine's spatial conventions, written once. Every spatial function links here.

Arrays and tensors
    Images are ``(N, C, D, H, W)``. D, H, W are the axes of a SimpleITK array, i.e. z, y, x, and
    an index into them is written ``(k, j, i)``. SimpleITK itself (spacing, origin, direction,
    physical points) uses ``(x, y, z)`` order; the conversion happens only in :mod:`geometry`.

Displacement fields
    A displacement ``u`` inside the engine is ``(N, 3, D, H, W)`` in *voxel units of the grid it
    lives on*, components in tensor-axis order ``(d, h, w)`` = ``(k, j, i)``. A deformation is
    ``phi(x) = x + u(x)``; functions say which of the two they take or return.

Direction
    Fields live on the fixed grid and pull from the moving image::

        warped(x) = moving(x + u(x))

    so ``phi`` maps fixed-space points to moving-space points. This is ITK's resampling transform
    and Slicer's "FromParent" transform. Points (landmarks) of the moving image move the other
    way: to carry a moving landmark into fixed space use the inverse.

Physical space
    Only at the boundary (:mod:`geometry`, :mod:`io`): voxel displacements become millimetres with
    the fixed image's spacing and direction. Files are ITK/LPS; Slicer is RAS (x and y negated).

Jacobian
    ``det(I + grad u)`` with ``grad`` in physical units, on the fixed grid; folding is ``det <= 0``.
"""

#: ``align_corners`` passed to every ``grid_sample`` / ``interpolate`` call in the engine.
#: ``True`` makes normalised coordinate -1 and +1 the *centres* of the first and last voxels, so
#: voxel index ``i`` of an axis of size ``n`` is exactly ``2 i / (n - 1) - 1``. Voxel centres are
#: where ITK places its samples, so a displacement in voxel units converts to the normalised cube
#: with a per-axis scale and no half-voxel offset, and resizing a field keeps voxel centres of the
#: first and last voxel fixed (the physical extent from first to last centre is preserved).
ALIGN_CORNERS = True

#: Number of spatial dimensions the engine works in.
NDIM = 3
