"""The registrations people use today, run the way their users run them, for the benchmark.

Each peer is one function ``peer(fixed, moving, out) -> Path``: it registers the ``moving`` image
file to the ``fixed`` one and writes one ITK file into the folder ``out``, the fixed -> moving map
in ITK's resampling sense (``warped(p) = moving(T(p))``, LPS mm), so that the benchmark's scorer
reads every method and peer the same way:

* a displacement-field image on the fixed grid (``.mha``/``.nii.gz``), or
* a linear transform (``.tfm``).

Settings are each tool's documented defaults, or the settings of the tool's own published
example, named in the docstring; nothing is tuned to the benchmark's data. A peer's package is
imported only when the peer runs, and :func:`available` says which ones can run here (the
packages are the ``bench`` extra: ``pip install .[bench]``). Random sampling (ANTs, elastix, the
SimpleITK metric) is left at each tool's default (SimpleITK's seed is fixed, but with more than
one thread its runs still differ slightly), so these peers' numbers vary a little from run to
run; on a small multimodal pair (prostate MR to ultrasound) ANTs SyN's gland Dice ranged from
0.28 to 0.75 over three runs.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional


class Peer(NamedTuple):
    name: str
    function: Callable[[str, str, Path], Path]
    distribution: Optional[str]  # pip packages it needs beyond the engine's, space-separated (None: SimpleITK only)
    description: str


def _read_sitk(path: str):
    import SimpleITK as sitk
    return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)


def _write_field_sitk(field, path: Path) -> Path:
    """A SimpleITK displacement-field image, float32 components (what every reader accepts)."""
    import SimpleITK as sitk
    sitk.WriteImage(sitk.Cast(field, sitk.sitkVectorFloat32), str(path))
    return path


# -- ANTs ------------------------------------------------------------------------------------------
def _ants(fixed: str, moving: str, out: Path, type_of_transform: str) -> Path:
    import ants
    f = ants.image_read(str(fixed), pixeltype="float")
    m = ants.image_read(str(moving), pixeltype="float")
    reg = ants.registration(f, m, type_of_transform=type_of_transform, outprefix=str(out / "ants_"))
    # ANTs' own composition of its transform list (affine, then warp) into one displacement field
    # on the fixed grid: exactly the map antsApplyTransforms would resample the moving image with
    composed = ants.apply_transforms(f, m, reg["fwdtransforms"], compose=str(out / "ants_"))
    if composed is None:
        raise RuntimeError("antsApplyTransforms did not write the composed field")
    return Path(composed)


def ants_syn(fixed: str, moving: str, out: Path) -> Path:
    """ANTs SyN through antspyx, ``type_of_transform="SyN"`` with every default (rigid + affine +
    deformable SyN, mutual information, ``reg_iterations=(40, 20, 0)``)."""
    return _ants(fixed, moving, out, "SyN")


def ants_syncc(fixed: str, moving: str, out: Path) -> Path:
    """ANTs SyN through antspyx, ``type_of_transform="SyNCC"`` (rigid + affine + SyN with
    cross-correlation, antspyx's preset, documented as tuned for brain images)."""
    return _ants(fixed, moving, out, "SyNCC")


# -- greedy ----------------------------------------------------------------------------------------
#: greedy's brain MRI settings, from its documentation's tutorial (greedy's README and the
#: ITK-SNAP "greedy" documentation, "Affine and deformable registration of brain MRI"):
#: affine ``-a -dof 12 -m NCC 2x2x2 -ia-image-centers -n 100x50x10``, then deformable
#: ``-m NCC 2x2x2 -it affine.mat -n 100x50x10`` (greedy's default smoothing ``-s 1.732vox 0.7071vox``).
GREEDY_AFFINE = "-a -dof 12 -m NCC 2x2x2 -ia-image-centers -n 100x50x10"
GREEDY_DEFORMABLE = "-m NCC 2x2x2 -n 100x50x10"


def _greedy_threads() -> str:
    import os
    n = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS") or os.environ.get("OMP_NUM_THREADS")
    return f" -threads {int(n)}" if n else ""


def greedy_affine(fixed: str, moving: str, out: Path) -> Path:
    """greedy's documented brain affine (:data:`GREEDY_AFFINE`), through picsl-greedy. greedy's
    matrix maps fixed to moving points in RAS; the ITK file written here is its LPS form."""
    from picsl_greedy import Greedy3D
    mat = out / "greedy_affine.mat"
    Greedy3D().execute(f"-d 3 -i {fixed} {moving} -o {mat} {GREEDY_AFFINE}{_greedy_threads()}")
    return _greedy_matrix_to_tfm(mat, out / "greedy_affine.tfm")


def _greedy_matrix_to_tfm(mat: Path, path: Path) -> Path:
    import SimpleITK as sitk
    lps = _greedy_lps_matrix(mat)
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(lps[:3, :3].ravel()))
    t.SetTranslation(tuple(lps[:3, 3]))
    sitk.WriteTransform(t, str(path))
    return path


def greedy(fixed: str, moving: str, out: Path) -> Path:
    """greedy's documented brain pipeline: :data:`GREEDY_AFFINE`, then :data:`GREEDY_DEFORMABLE`
    from it; the result is greedy's own composition of warp and affine (``-rc``) into one
    displacement field on the fixed grid (ITK LPS mm, what the scorer reads)."""
    from picsl_greedy import Greedy3D
    g = Greedy3D()
    mat, warp, composed = out / "greedy_affine.mat", out / "greedy_warp.nii.gz", out / "greedy_composed.nii.gz"
    th = _greedy_threads()
    g.execute(f"-d 3 -i {fixed} {moving} -o {mat} {GREEDY_AFFINE}{th}")
    g.execute(f"-d 3 -i {fixed} {moving} -it {mat} -o {warp} {GREEDY_DEFORMABLE}{th}")
    g.execute(f"-d 3 -rf {fixed} -rc {composed} -r {warp} {mat}{th}")
    return _write_field_sitk(sitk_vector(composed), out / "greedy_field.mha")


def _greedy_lps_matrix(mat: Path):
    """greedy's RAS matrix file as the 4x4 LPS matrix of the same fixed -> moving map."""
    import numpy as np
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ np.loadtxt(str(mat)) @ flip


# -- ConvexAdam ------------------------------------------------------------------------------------
def convexadam(fixed: str, moving: str, out: Path) -> Path:
    """ConvexAdam (Siebert, Hansen and Heinrich 2021; the ``convexAdam`` package), as its authors
    run it on brains: on images already aligned affinely and on one grid (the Learn2Reg OASIS
    task). Here the affine is greedy's documented brain affine (:data:`GREEDY_AFFINE`); the moving
    image is resampled onto the fixed grid with it, and ``convex_adam_pt`` runs with every default
    (MIND-SSC ``mind_r=1, mind_d=2``, coupled convex step on a 6-voxel grid with ``disp_hw=4``,
    inverse consistency, 80 Adam steps on a 2-voxel grid, ``lambda_weight=1.25``), in float32 on
    the CPU. The result is the composition (affine after the deformation) as one displacement
    field on the fixed grid."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt
    from picsl_greedy import Greedy3D
    mat = out / "greedy_affine.mat"
    Greedy3D().execute(f"-d 3 -i {fixed} {moving} -o {mat} {GREEDY_AFFINE}{_greedy_threads()}")
    lps = _greedy_lps_matrix(mat)
    f, m = _read_sitk(fixed), _read_sitk(moving)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple(lps[:3, :3].ravel()))
    affine.SetTranslation(tuple(lps[:3, 3]))
    m_on_f = sitk.Resample(m, f, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    # arrays in SimpleITK's (k, j, i) order; ConvexAdam's displacement is in voxels along those axes,
    # pulling the moving image: warped[x] = moving[x + d(x)]
    d = convex_adam_pt(sitk.GetArrayFromImage(f), sitk.GetArrayFromImage(m_on_f), dtype=torch.float32,
                       device=torch.device("cpu"))
    d_ijk = np.asarray(d, dtype=np.float64)[..., ::-1]  # (k, j, i, 3) -> components along (i, j, k)
    direction = np.asarray(f.GetDirection(), dtype=np.float64).reshape(3, 3)
    to_mm = direction @ np.diag(f.GetSpacing())
    u = d_ijk @ to_mm.T  # physical displacement of each fixed point, before the affine
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in f.GetSize()[::-1]], indexing="ij")
    points = np.stack([i, j, k], -1) @ to_mm.T + np.asarray(f.GetOrigin())
    total = (points + u) @ lps[:3, :3].T + lps[:3, 3] - points  # T(p) - p, T = affine o (p + u)
    field = sitk.GetImageFromArray(total.astype(np.float32), isVector=True)
    field.CopyInformation(f)
    return _write_field_sitk(field, out / "convexadam_field.mha")


def sitk_vector(path: Path):
    import SimpleITK as sitk
    img = sitk.ReadImage(str(path))
    if img.GetNumberOfComponentsPerPixel() != 3:  # a 5D NIfTI vector image reads as 4D scalar
        img = sitk.Compose([sitk.VectorIndexSelectionCast(img, i) for i in range(3)]) \
            if img.GetNumberOfComponentsPerPixel() > 1 else img
    return img


# -- elastix ----------------------------------------------------------------------------------------
def elastix_affine_bspline(fixed: str, moving: str, out: Path) -> Path:
    """elastix through itk-elastix: the default ``affine`` parameter map followed by the default
    ``bspline`` map (``ParameterObject.GetDefaultParameterMap``), the tool's documented starting
    point. The result is transformix's deformation field on the fixed grid."""
    import itk
    f = itk.imread(str(fixed), itk.F)
    m = itk.imread(str(moving), itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("affine"))
    params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
    work = out / "elastix"
    work.mkdir(parents=True, exist_ok=True)
    _, result = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False,
                                                output_directory=str(work))
    # transformix writes deformationField.nii into its output directory (else the current one)
    field = itk.transformix_deformation_field(m, result, output_directory=str(work), log_to_console=False)
    path = out / "elastix_displacement.mha"
    itk.imwrite(field, str(path))
    return path


# -- SimpleITK --------------------------------------------------------------------------------------
def _sitk_affine_transform(f, m):
    """Affine registration with the settings of SimpleITK's registration tutorial
    (SimpleITK-Notebooks, ``60_Registration_Introduction``): geometric centring, Mattes mutual
    information with 50 bins on a 1 % random sample, gradient descent (learning rate 1, 100
    iterations, convergence 1e-6 over 10), scales from physical shift, three levels with shrink
    factors 4, 2, 1 and smoothing sigmas 2, 1, 0 mm."""
    import SimpleITK as sitk
    initial = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.01, seed=0)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsGradientDescent(learningRate=1.0, numberOfIterations=100,
                                      convergenceMinimumValue=1e-6, convergenceWindowSize=10)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrinkFactors=[4, 2, 1])
    reg.SetSmoothingSigmasPerLevel(smoothingSigmas=[2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    t = reg.Execute(f, m)
    while isinstance(t, sitk.CompositeTransform) and t.GetNumberOfTransforms() == 1:
        t = t.GetNthTransform(0)
    return t


def sitk_affine(fixed: str, moving: str, out: Path) -> Path:
    """The affine-only baseline: SimpleITK affine registration alone (see
    :func:`_sitk_affine_transform` for its settings), written as a ``.tfm``."""
    import SimpleITK as sitk
    t = _sitk_affine_transform(_read_sitk(fixed), _read_sitk(moving))
    path = out / "sitk_affine.tfm"
    sitk.WriteTransform(t, str(path))
    return path


def sitk_affine_demons(fixed: str, moving: str, out: Path) -> Path:
    """SimpleITK affine (as :func:`sitk_affine`) then demons with the settings of SimpleITK's
    ``Examples/DemonsRegistration/DemonsRegistration2.py``: histogram matching of the moving image
    to the fixed one (1024 levels, 128 for 8-bit images; 7 match points, threshold at the mean),
    ``FastSymmetricForcesDemonsRegistrationFilter`` with 200 iterations and standard deviation 1,
    started from the affine as a displacement field (as that example does with its initial
    transform). Demons assumes the same contrast; on a multimodal pair it is expected to do badly,
    as it does for its users."""
    import SimpleITK as sitk
    f8 = sitk.ReadImage(str(fixed))
    f = sitk.Cast(f8, sitk.sitkFloat32)
    m = _read_sitk(moving)
    affine = _sitk_affine_transform(f, m)
    if (m.GetSize() != f.GetSize() or m.GetSpacing() != f.GetSpacing() or m.GetOrigin() != f.GetOrigin()
            or m.GetDirection() != f.GetDirection()):
        # demons compares the two images voxel by voxel: put the moving image on the fixed grid
        # first (identity map, a change of sampling only; the affine is applied by the field)
        m = sitk.Resample(m, f, sitk.Transform(), sitk.sitkLinear, 0.0)
    matcher = sitk.HistogramMatchingImageFilter()
    matcher.SetNumberOfHistogramLevels(128 if f8.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8) else 1024)
    matcher.SetNumberOfMatchPoints(7)
    matcher.ThresholdAtMeanIntensityOn()
    m = matcher.Execute(m, f)
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(f)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    initial = to_field.Execute(affine)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(200)
    demons.SetStandardDeviations(1.0)
    field = demons.Execute(f, m, initial)
    return _write_field_sitk(field, out / "sitk_demons_displacement.mha")


# -- identity ---------------------------------------------------------------------------------------
def identity(fixed: str, moving: str, out: Path) -> Path:
    """Doing nothing: the identity transform (the 'before' of every score)."""
    import SimpleITK as sitk
    path = out / "identity.tfm"
    sitk.WriteTransform(sitk.AffineTransform(3), str(path))
    return path


PEERS: Dict[str, Peer] = {p.name: p for p in (
    Peer("ants-syn", ants_syn, "antspyx", "ANTs SyN (antspyx, type_of_transform='SyN', defaults)"),
    Peer("ants-syncc", ants_syncc, "antspyx", "ANTs SyN with cross-correlation (antspyx 'SyNCC' preset)"),
    Peer("elastix-affine-bspline", elastix_affine_bspline, "itk-elastix",
         "elastix default affine + default B-spline parameter maps (itk-elastix)"),
    Peer("sitk-affine-demons", sitk_affine_demons, None,
         "SimpleITK affine (Mattes MI) + fast symmetric-forces demons (SimpleITK examples' settings)"),
    Peer("sitk-affine", sitk_affine, None, "affine-only baseline: the SimpleITK affine alone"),
    Peer("greedy", greedy, "picsl-greedy", "greedy (picsl-greedy): its documented brain affine + deformable NCC pipeline"),
    Peer("convexadam", convexadam, "convexAdam picsl-greedy",
         "ConvexAdam (convexAdam package, every default: MIND-SSC, convex step + 80 Adam steps) after greedy's brain affine"),
    Peer("greedy-affine", greedy_affine, "picsl-greedy", "greedy's documented brain affine alone"),
    Peer("identity", identity, None, "identity transform (doing nothing)"),
)}

#: peers that are not registrations; left out of the "fastest peer" a method's time is compared to
NOT_A_REGISTRATION = ("identity",)


def available(name: str) -> bool:
    """Whether the peer's package is installed here (asked of the package metadata, without
    importing it)."""
    for dist in (PEERS[name].distribution or "").split():
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            return False
    return True


def missing_message(name: str) -> str:
    dist = PEERS[name].distribution
    return f"skipping peer {name}: it needs {dist} (pip install {dist}, or pip install .[bench])"


def peer_names() -> List[str]:
    return list(PEERS)


def run_peer(name: str, fixed: str, moving: str, out: Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return PEERS[name].function(fixed, moving, out)
