"""Rigid and affine alignment over the full rotation range (issue 5's D-Net / SAM-affine study).

    python benchmarks/pose_range.py [--quick] [--angles 11] [--methods dnet same-affine sitk-rigid ...]

The labelled brain (``shared/data/brain_aseg``, 2 mm) is the fixed image; the moving image is the
same brain under a known rigid pose: a rotation by ``theta`` about the axis ``(1, 1, 1)/sqrt(3)``
through the brain's centre, ``theta`` in ``linspace(-pi, pi, angles)``, plus a fixed translation,
resampled onto a cube big enough to hold every pose (nothing is cut off). Each initializer returns
a 4x4 LPS matrix (fixed -> moving points, the engine's convention) that is scored by

* rotation error: ``arccos((trace(R_est^T R_true) - 1) / 2)`` in degrees (the paper's trace formula;
  for affine fits, ``R_est`` is the rotation of the polar decomposition);
* translation error: ``|T_est(c) - T_true(c)|`` in mm at the fixed image centre ``c`` (independent of
  where the rotation centre is put);
* mean Dice over the 30 usual labels of the moving labels carried back through ``T_est``.

Peers: SimpleITK's iterative rigid (``Euler3DTransform``) and affine registration with geometric
centre initialisation, Mattes mutual information, regular-step gradient descent and a 3-level
pyramid (the settings of SimpleITK's registration examples). Results go to ``benchmarks/results/pose-DATE.json``;
``make_report.py`` puts them in ``docs/BENCHMARKS.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
AXIS = np.ones(3) / math.sqrt(3.0)
TRANSLATION_MM = np.array([12.0, -8.0, 6.0])


def rotation_about(axis: np.ndarray, theta: float) -> np.ndarray:
    """Rodrigues' formula: the 3x3 rotation by ``theta`` (radians) about the unit ``axis``."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(theta) * k + (1 - math.cos(theta)) * k @ k


def rotation_error_deg(r_est: np.ndarray, r_true: np.ndarray) -> float:
    """Geodesic angle between two rotations (trace formula), degrees; an affine ``r_est`` is
    replaced by the rotation of its polar decomposition."""
    u, _, vt = np.linalg.svd(r_est)
    r = u @ np.diag([1, 1, np.sign(np.linalg.det(u @ vt))]) @ vt
    c = (np.trace(r.T @ r_true) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def matrix_to_sitk(m: np.ndarray) -> sitk.AffineTransform:
    t = sitk.AffineTransform(3)
    t.SetMatrix(m[:3, :3].ravel().tolist())
    t.SetTranslation(m[:3, 3].tolist())
    return t


def sitk_to_matrix(t: sitk.Transform) -> np.ndarray:
    """4x4 of a SimpleITK linear transform (CompositeTransform of one, Euler, Affine)."""
    if isinstance(t, sitk.CompositeTransform) or t.GetName() == "CompositeTransform":
        t = sitk.CompositeTransform(t)
        m = np.eye(4)
        for i in range(t.GetNumberOfTransforms()):  # applied last-added first
            m = m @ sitk_to_matrix(t.GetNthTransform(i))
        return m
    # every linear ITK transform is x -> A (x - c) + c + t
    t = t.Downcast() if hasattr(t, "Downcast") else t
    mat = np.array(t.GetMatrix()).reshape(3, 3)
    c = np.array(t.GetCenter())
    tr = np.array(t.GetTranslation())
    m = np.eye(4)
    m[:3, :3] = mat
    m[:3, 3] = tr + c - mat @ c
    return m


#: direction of the OASIS scans (row-major): the brain_aseg arrays share their voxel layout
OASIS_DIRECTION = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)


def load_brain(spacing_mm: float = 2.0):
    """The labelled brain block-averaged to ``spacing_mm`` (labels by nearest/stride), as an
    anatomically oriented image: the npz has no header, but its arrays are indexed ``(x, y, z)``
    in the OASIS scans' voxel layout (160 x 192 x 224; correlation 0.89 with an OASIS scan), so
    they are transposed to SimpleITK's ``(z, y, x)`` and given the OASIS direction. (Read as
    ``(z, y, x)`` with the identity direction, as this benchmark did before 2026-12-03, the brain
    is mirrored, which misleads any method that knows anatomy's handedness, D-Net first.)"""
    src = SHARED / "brain_aseg" / "test_scan.npz"
    if not src.is_file():
        return None
    data = np.load(src)
    f = int(round(spacing_mm))
    vol = torch.from_numpy(data["vol"].astype(np.float32))[None, None]
    vol = F.avg_pool3d(vol, f, f)[0, 0].numpy()
    seg = data["seg"][f // 2::f, f // 2::f, f // 2::f].astype(np.int16)
    labels = [int(x) for x in np.load(SHARED / "brain_aseg" / "labels.npz")["labels"]]
    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.transpose(2, 1, 0)))
    lab = sitk.GetImageFromArray(np.ascontiguousarray(seg.transpose(2, 1, 0)))
    for x in (img, lab):
        x.SetSpacing((float(f),) * 3)
        x.SetDirection(OASIS_DIRECTION)
    return img, lab, labels


def posed_pair(img: sitk.Image, lab: sitk.Image, theta: float):
    """Moving image and labels under the true pose ``A`` (fixed -> moving points) on a cube that
    holds the whole rotated brain; returns (moving, moving_labels, A)."""
    size = np.array(img.GetSize()) * np.array(img.GetSpacing())
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))
    a = np.eye(4)
    a[:3, :3] = rotation_about(AXIS, theta)
    a[:3, 3] = centre + TRANSLATION_MM - a[:3, :3] @ centre
    side = float(np.linalg.norm(size)) + 2 * np.abs(TRANSLATION_MM).max()
    sp = img.GetSpacing()[0]
    n = int(math.ceil(side / sp))
    ref = sitk.Image([n] * 3, sitk.sitkFloat32)
    ref.SetSpacing((sp,) * 3)
    ref.SetOrigin(tuple(centre + TRANSLATION_MM - (n - 1) / 2 * sp))
    # moving(y) = fixed(A^-1 y): resampling pulls through A^-1
    inv = matrix_to_sitk(np.linalg.inv(a))
    moving = sitk.Resample(img, ref, inv, sitk.sitkLinear, 0.0)
    moving_lab = sitk.Resample(lab, ref, inv, sitk.sitkNearestNeighbor, 0, lab.GetPixelID())
    return moving, moving_lab, a


def engine_initializer(name: str, **options) -> Callable:
    def run(fixed, moving, device):
        from deepreglib.classic.initial import INITIALIZERS, initial_transform
        from deepreglib.io.images import image_to_tensor
        from deepreglib.run.initializers import register_learned_initializers
        register_learned_initializers()  # dnet, same-affine and their refined forms, from the shipped weights
        if name not in INITIALIZERS:
            raise LookupError(f"--init {name} is not available (are its weights shipped?)")
        f, gf = image_to_tensor(fixed)
        m, gm = image_to_tensor(moving)
        return initial_transform(name, f, gf, m, gm, device=device, **options)
    return run


def sitk_initializer(kind: str) -> Callable:
    def run(fixed, moving, device):
        tx = sitk.Euler3DTransform() if kind == "rigid" else sitk.AffineTransform(3)
        init = sitk.CenteredTransformInitializer(fixed, moving, tx, sitk.CenteredTransformInitializerFilter.GEOMETRY)
        r = sitk.ImageRegistrationMethod()
        r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        r.SetMetricSamplingStrategy(r.RANDOM)
        r.SetMetricSamplingPercentage(0.1, seed=0)
        r.SetInterpolator(sitk.sitkLinear)
        r.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=200,
                                                   gradientMagnitudeTolerance=1e-8)
        r.SetOptimizerScalesFromPhysicalShift()
        r.SetShrinkFactorsPerLevel([4, 2, 1])
        r.SetSmoothingSigmasPerLevel([2, 1, 0])
        r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        r.SetInitialTransform(init, inPlace=False)
        out = r.Execute(sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32))
        return sitk_to_matrix(out)
    return run


METHODS: Dict[str, Callable[[], Callable]] = {
    "dnet": lambda: engine_initializer("dnet"),
    "same-affine": lambda: engine_initializer("same-affine"),
    "same-affine-ransac": lambda: engine_initializer("same-affine", fit="ransac"),
    "same-affine-irls": lambda: engine_initializer("same-affine", fit="irls"),
    "dnet+rigid": lambda: engine_initializer("dnet+rigid"),
    "same-affine+affine": lambda: engine_initializer("same-affine+affine"),
    "engine-rigid": lambda: engine_initializer("rigid"),
    "sitk-rigid": lambda: sitk_initializer("rigid"),
    "sitk-affine": lambda: sitk_initializer("affine"),
}


def dice_mean(fixed_lab: sitk.Image, moving_lab: sitk.Image, m: np.ndarray, labels: List[int]) -> float:
    warped = sitk.Resample(moving_lab, fixed_lab, matrix_to_sitk(m), sitk.sitkNearestNeighbor, 0,
                           moving_lab.GetPixelID())
    a, b = sitk.GetArrayFromImage(fixed_lab), sitk.GetArrayFromImage(warped)
    d = []
    for lab in labels:
        x, y = a == lab, b == lab
        s = x.sum() + y.sum()
        if x.sum() > 0:
            d.append(2 * np.logical_and(x, y).sum() / s if s else 1.0)
    return float(np.mean(d))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--angles", type=int, default=11)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--quick", action="store_true", help="5 angles")
    p.add_argument("--max-angle", type=float, default=180.0,
                   help="degrees: the angles are linspace(-max, max, --angles) (default the full range)")
    p.add_argument("--name", default="pose", help="results file prefix: NAME-DATE.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--extra", nargs="+", default=[], metavar="NAME=INIT:WEIGHTS",
                   help="also run the learned initializer INIT (dnet, same-affine) with other weights as NAME")
    p.add_argument("--update", default=None, metavar="POSE.json",
                   help="run the methods on that file's angles and add (or replace) their entries in it")
    p.add_argument("--note", default=None, help="with --update: a sentence appended to the file's notes")
    args = p.parse_args(argv)
    methods = dict(METHODS)
    for item in args.extra:
        name, sep, rest = item.partition("=")
        init, sep2, weights = rest.partition(":")
        if not (sep and sep2 and name and init and weights):
            raise SystemExit(f"--extra needs NAME=INIT:WEIGHTS, got {item!r}")
        if not Path(weights).is_file():
            raise SystemExit(f"--extra {item}: no weights file {weights}")
        methods[name] = (lambda i=init, w=weights: engine_initializer(i, weights=w))
    names = list(args.methods) + [item.partition("=")[0] for item in args.extra]
    previous = json.loads(Path(args.update).read_text()) if args.update else None
    torch.set_num_threads(args.threads)
    brain = load_brain()
    if brain is None:
        print(f"skipping: {SHARED / 'brain_aseg'} is absent", file=sys.stderr)
        return 0
    img, lab, labels = brain
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))
    n = 5 if args.quick else args.angles
    thetas = (np.radians([r["theta_deg"] for r in previous["rows"]]) if previous
              else np.radians(np.linspace(-args.max_angle, args.max_angle, n)))
    rows = []
    for theta in thetas:
        moving, moving_lab, a = posed_pair(img, lab, float(theta))
        row = {"theta_deg": float(np.degrees(theta)), "dice_before": dice_mean(lab, moving_lab, np.eye(4), labels),
               "methods": {}}
        for name in names:
            try:
                fn = methods[name]()
                t0 = time.perf_counter()
                m = fn(img, moving, args.device)
                wall = time.perf_counter() - t0
            except LookupError as e:
                print(f"skipping {name}: {e}", file=sys.stderr)
                continue
            est_c = m[:3, :3] @ centre + m[:3, 3]
            true_c = a[:3, :3] @ centre + a[:3, 3]
            row["methods"][name] = {"rotation_error_deg": rotation_error_deg(m[:3, :3], a[:3, :3]),
                                    "translation_error_mm": float(np.linalg.norm(est_c - true_c)),
                                    "dice": dice_mean(lab, moving_lab, m, labels), "seconds": wall}
            r = row["methods"][name]
            print(f"theta {row['theta_deg']:7.1f}  {name:20s} rot {r['rotation_error_deg']:6.1f} deg  "
                  f"trans {r['translation_error_mm']:6.1f} mm  dice {r['dice']:.3f}  {wall:5.1f} s", flush=True)
        rows.append(row)
    if previous is not None:
        for old_row, new_row in zip(previous["rows"], rows):
            old_row["methods"].update(new_row["methods"])
        if args.note:
            previous["notes"] = (previous.get("notes", "") + " " + args.note).strip()
        Path(args.update).write_text(json.dumps(previous, indent=1))
        print(f"updated {args.update}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = out / f"{args.name}-{stamp}.json"
    path.write_text(json.dumps({"date": stamp, "machine": platform.processor() or platform.machine(),
                                "threads": args.threads, "device": args.device, "axis": AXIS.tolist(),
                                "translation_mm": TRANSLATION_MM.tolist(), "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


def markdown_section(result: dict) -> List[str]:
    """The BENCHMARKS.md section of one pose-DATE.json."""
    names = sorted({k for r in result["rows"] for k in r["methods"]})
    lines = [f"Run of {result['date']} ({result['device']}, {result['threads']} threads): the labelled brain "
             f"(2 mm) against itself under a rotation by theta about (1,1,1)/sqrt(3) plus a translation of "
             f"{result['translation_mm']} mm. Rotation error (degrees) / translation error at the image centre "
             "(mm) / mean Dice of the 30 labels after alignment.", "",
             "| theta (deg) | Dice before | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for r in result["rows"]:
        cells = []
        for n in names:
            m = r["methods"].get(n)
            cells.append("-" if m is None else
                         f"{m['rotation_error_deg']:.1f}° / {m['translation_error_mm']:.1f} / {m['dice']:.2f}")
        lines.append(f"| {r['theta_deg']:.0f} | {r['dice_before']:.2f} | " + " | ".join(cells) + " |")
    lines.append("| **median** | | " + " | ".join(
        "{:.1f}° / {:.1f} / {:.2f}".format(*[float(np.median([r["methods"][n][k] for r in result["rows"]
                                                             if n in r["methods"]]))
                                            for k in ("rotation_error_deg", "translation_error_mm", "dice")])
        if any(n in r["methods"] for r in result["rows"]) else "-" for n in names) + " |")
    lines.append("| **mean seconds** | | " + " | ".join(
        "{:.1f}".format(float(np.mean([r["methods"][n]["seconds"] for r in result["rows"] if n in r["methods"]])))
        if any(n in r["methods"] for r in result["rows"]) else "-" for n in names) + " |")
    if result.get("notes"):
        lines += ["", result["notes"]]
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
