"""Study (issue 16, the 1 mm gap): what a sparse 1 mm level after the balanced schedule would gain.

    python benchmarks/fine_level_study.py [THREADS] ['[{"fraction": 0.1, ...}, ...]'] [--out FILE]

Validation data only: the unlabelled OASIS brains at 1 mm (``oasis_unlabeled``) under the
brain_aseg benchmark's kind of random diffeomorphism, seeds 40 000 on (as ``instance_tuning.py``'s
``known`` set; no pair of any benchmark's test data). No initial alignment: the pair differs by
the known field alone. ``balanced@2mm`` is :data:`~deepreglib.classic.instance.FROM_AFFINE` on the
2 mm grid the engine uses for these brains; each variant then runs one more level at 1 mm with the
field on a 2 mm grid and the similarity on a subset of voxels only: the ``fraction`` of the
foreground voxels with the strongest fixed-image edges, scored as the squared difference of
the locally normalised images (mean and deviation over a ``window``^3 box, each image
normalised once before warping), its gradient through the moving image's precomputed slopes.
Endpoint error (mm) inside the foreground against the true field. A prototype, not the engine's
code: results in ``benchmarks/results/fine-level-study-DATE.json``.
Endpoint errors are in voxels of the 1 mm grid, i.e. mm.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SHARED = HERE.parent.parent / "shared" / "data"

from datasets import known_deformation  # noqa: E402
from deepreglib.classic.adam import Adam  # noqa: E402
from deepreglib.classic.instance import FROM_AFFINE, _smoothed, foreground_box, instance_register  # noqa: E402
from deepreglib.classic.optimise import _level  # noqa: E402
from deepreglib.core.fields import resize_field  # noqa: E402
from deepreglib.core.losses import GradientSmoothness, box_sum_cumsum  # noqa: E402
from deepreglib.core.preprocess import normalize_intensity  # noqa: E402
from deepreglib.core.warp import _central_differences, sample_at, warp  # noqa: E402


def case(path: Path, seed: int):
    """``(fixed, moving, true field)`` of one val brain under the benchmark's kind of deformation."""
    vol = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32))[None, None]
    u, w = known_deformation(vol.shape[2:], seed)
    return vol, warp(vol, w), u


def local_normalise(x, window=5, eps=1e-3):
    n = float(window ** 3)
    mean = box_sum_cumsum(x, (window,) * 3) / n
    var = (box_sum_cumsum(x * x, (window,) * 3) / n - mean * mean).clamp_min(0)
    return (x - mean) / torch.sqrt(var + eps)


class _SampleWithSlopes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, points):
        # table (1, 4, D, H, W): value and its (k, j, i) slopes; points (1, 3, 1, 1, N)
        with torch.no_grad():
            s = sample_at(table, points, padding="border")
        ctx.save_for_backward(s[:, 1:])
        return s[:, :1]

    @staticmethod
    def backward(ctx, grad):
        (slopes,) = ctx.saved_tensors
        return None, grad * slopes


def sparse_level(f, m, u0, steps=20, fraction=0.1, window=5, lr=0.5, weight=1.0, total=1.0, passes=1,
                 field_factor=2, tol=1e-4):
    """One level on the 1 mm box images ``f``, ``m`` from the field ``u0`` (their voxels): the
    field on a grid ``field_factor`` coarser, the similarity at the ``fraction`` of the foreground
    voxels with the strongest fixed edges (module docstring). Returns ``(u, timings and counts)``."""
    t0 = time.perf_counter()
    shape = f.shape[2:]
    fn, mn = local_normalise(f, window), local_normalise(m, window)
    table = torch.cat([mn, _central_differences(mn)], dim=1).contiguous()
    # points: the fixed image's strongest edges inside the foreground
    gmag = _central_differences(fn).pow(2).sum(1)[0]
    fg = (f[0, 0] > 0.05)
    score = torch.where(fg, gmag, torch.zeros_like(gmag)).flatten()
    k = int(fraction * fg.sum())
    idx = torch.topk(score, k).indices
    kji = torch.stack([idx // (shape[1] * shape[2]), (idx // shape[2]) % shape[1], idx % shape[2]]).float()
    target = fn.flatten()[idx]
    field_shape = [max(2, int(round((s - 1) / field_factor)) + 1) for s in shape]
    base = resize_field(u0, field_shape)
    scale = torch.tensor([(fs - 1) / (s - 1) for fs, s in zip(field_shape, shape)])
    pts_field = (kji * scale[:, None]).view(1, 3, 1, 1, k)
    pts = kji.view(1, 3, 1, 1, k)
    p = torch.zeros_like(base).requires_grad_(True)
    opt = Adam([p], lr=lr, eps=1.0 / k)
    smooth = GradientSmoothness("l2")
    t1 = time.perf_counter()
    hist = []
    for step in range(steps):
        opt.lr = lr * (1 - 0.9 * step / max(steps - 1, 1))
        opt.zero_grad()
        d = _smoothed(p, passes)
        q = base + d
        uq = sample_at(q, pts_field, padding="border") / scale.view(1, 3, 1, 1, 1)
        warped = _SampleWithSlopes.apply(table, pts + uq)
        loss = (warped[0, 0, 0, 0] - target).pow(2).mean() * 0.5 + weight * smooth(d) + total * smooth(q)
        loss.backward()
        opt.step()
        hist.append(float(loss.detach()))
        if len(hist) > 10 and hist[-11] - min(hist[-10:]) < tol:
            break
    with torch.no_grad():
        u = resize_field(base + _smoothed(p.detach(), passes), shape)
    return u, dict(prep=t1 - t0, loop=time.perf_counter() - t1, steps=len(hist), points=k)


def epe(u, gt, fg):
    return float((u - gt).pow(2).sum(1).sqrt()[0][fg].mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("threads", nargs="?", type=int, default=1)
    p.add_argument("variants", nargs="?", default="[{}]", help="JSON list of sparse_level keyword sets")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    subjects = sorted((SHARED / "oasis_unlabeled").glob("subject_*.nii.gz"))
    if not subjects:
        print(f"fine_level_study needs {SHARED / 'oasis_unlabeled'} (absent)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    variants = json.loads(args.variants)
    today = datetime.date.today().isoformat()
    out = args.out or HERE / "results" / f"fine-level-study-{today}.json"
    rows = []
    for i in range(2):
        seed = 40_000 + i
        fixed, moving, gt = case(subjects[i], seed)
        f, m = normalize_intensity(fixed), normalize_intensity(moving)
        lo, hi = foreground_box(f, m)
        box = (Ellipsis,) + tuple(slice(a, b) for a, b in zip(lo, hi))
        fb, mb, gtb = f[box].contiguous(), m[box].contiguous(), gt[box]
        fg = fb[0, 0] > 0.05
        t = time.perf_counter()
        u2 = instance_register(_level(fb, 2.0), _level(mb, 2.0), schedule=FROM_AFFINE, crop=False)
        t_bal = time.perf_counter() - t
        u_bal = resize_field(u2, fb.shape[2:])
        none = epe(torch.zeros_like(gtb), gtb, fg)
        print(f"case {i} box {tuple(fb.shape[2:])} none {none:.3f} balanced@2mm {epe(u_bal, gtb, fg):.3f} "
              f"in {t_bal:.1f}s", flush=True)
        common = {"case": i, "subject": subjects[i].name, "seed": seed}
        rows.append({**common, "variant": "balanced@2mm", "epe_mm": epe(u_bal, gtb, fg), "epe_none_mm": none,
                     "seconds": t_bal})
        for v in variants:
            u, info = sparse_level(fb, mb, u_bal, **v)
            print(f"   {v}: {epe(u, gtb, fg):.3f} {info}", flush=True)
            rows.append({**common, "variant": v, "epe_mm": epe(u, gtb, fg), **info})
    out.write_text(json.dumps({"date": today, "threads": torch.get_num_threads(),
                               "machine": platform.processor() or platform.machine(), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
