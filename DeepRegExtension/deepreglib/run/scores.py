"""The numbers of a run's manifest: similarity before and after, the transform's regularity, and
Dice and landmark errors when labels and landmarks were given.

They are accumulated slab by slab while the outputs are made (:class:`Scores`, fed by
``run/write.py``), so no full-resolution volume is kept for them; the sums are float64 and the
results equal the whole-volume formulas (:func:`deepreglib.core.metrics.ncc_metric`,
:func:`~deepreglib.core.jacobian.std_log_jacobian`, ...) up to summation order.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch

from ..core.resample import resample_to_grid
from ..core.warp import sample_at
from .load import Inputs
from .to_fixed_grid import FixedGridResult, Slab


class _Moments:
    """Count, mean and sum of squared deviations of a stream (Chan et al.'s pairwise merge)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1).double()
        n = x.numel()
        if not n:
            return
        mean = float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


class _Correlation:
    """Global NCC of two streams (float64 sums, shifted by the first values so that a constant
    image gives exactly 0 variance and therefore nan, as :func:`ncc_metric` does)."""

    def __init__(self):
        self.shift = None
        self.n, self.sa, self.sb, self.saa, self.sbb, self.sab = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.reshape(-1).double(), b.reshape(-1).double()
        if self.shift is None:
            self.shift = (float(a[0]), float(b[0]))
        a, b = a - self.shift[0], b - self.shift[1]
        self.n += a.numel()
        self.sa += float(a.sum())
        self.sb += float(b.sum())
        self.saa += float((a * a).sum())
        self.sbb += float((b * b).sum())
        self.sab += float((a * b).sum())

    def value(self) -> float:
        n = max(self.n, 1)
        ma, mb = self.sa / n, self.sb / n
        var_a, var_b = self.saa / n - ma * ma, self.sbb / n - mb * mb
        cov = self.sab / n - ma * mb
        if var_a <= 0 or var_b <= 0:
            return float("nan")
        return cov / math.sqrt(var_a * var_b)


class _Overlap:
    """Per-label voxel counts for Dice (``2 |A n B| / (|A| + |B|)``, nan where both are empty)."""

    def __init__(self):
        self.a: Dict[int, int] = {}
        self.b: Dict[int, int] = {}
        self.ab: Dict[int, int] = {}

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.reshape(-1).long(), b.reshape(-1).long()
        for counts, values in ((self.a, a), (self.b, b)):
            labels, n = torch.unique(values, return_counts=True)
            for label, c in zip(labels.tolist(), n.tolist()):
                counts[label] = counts.get(label, 0) + c
        same = a[a == b]
        labels, n = torch.unique(same, return_counts=True)
        for label, c in zip(labels.tolist(), n.tolist()):
            self.ab[label] = self.ab.get(label, 0) + c

    def dice(self) -> Dict[int, float]:
        labels = sorted((set(self.a) | set(self.b)) - {0})
        out = {}
        for label in labels:
            total = self.a.get(label, 0) + self.b.get(label, 0)
            out[label] = float("nan") if total == 0 else 2.0 * self.ab.get(label, 0) / total
        return out


class Scores:
    """The manifest's metrics of one run, accumulated over the fixed grid's slabs: call
    :meth:`add` for every slab (any order, each once), then :meth:`result`."""

    def __init__(self, inputs: Inputs, fx: FixedGridResult):
        self.inputs, self.fx = inputs, fx
        self.ncc_before, self.ncc_after = _Correlation(), _Correlation()
        self.log_jac = _Moments()
        self.folded = 0
        self.jac_min, self.jac_max = math.inf, -math.inf
        self.max_u2 = 0.0
        self.dice = (_Overlap(), _Overlap()) if self.has_dice else None

    @property
    def has_dice(self) -> bool:
        return "fixed_labels" in self.inputs.labels and "moving_labels" in self.inputs.labels

    def add(self, slab: Slab, labels_after: Optional[torch.Tensor] = None) -> None:
        """One slab; ``labels_after``: the moving labels through the transform on it (as written),
        computed here if needed and not given."""
        fixed = self.inputs.fixed[:, :, slab.k0:slab.k1]
        self.ncc_before.add(fixed, slab.before)
        self.ncc_after.add(fixed, slab.warped)
        jac = slab.jacobian
        self.folded += int((jac <= 0).sum())
        self.jac_min = min(self.jac_min, float(jac.min()))
        self.jac_max = max(self.jac_max, float(jac.max()))
        self.log_jac.add(jac.double().clamp(1e-9, 1e9).log())
        if slab.u_mm is not None:
            self.max_u2 = max(self.max_u2, float((slab.u_mm.double() ** 2).sum(dim=1).max()))
        if self.dice is not None:
            ml, mg = self.inputs.labels["moving_labels"]
            fl = resample_to_grid(*self.inputs.labels["fixed_labels"], slab.grid, interpolation="nearest").round()
            before = resample_to_grid(ml, mg, slab.grid, interpolation="nearest").round()
            if labels_after is None:
                labels_after = self.fx.resample_on_fixed(ml, mg, slab.grid, interpolation="nearest")
            self.dice[0].add(fl, before)
            self.dice[1].add(fl, labels_after.round())

    def result(self) -> Dict[str, object]:
        n = self.log_jac.n
        m = {"ncc_before": self.ncc_before.value(), "ncc_after": self.ncc_after.value(),
             "folding_percent": 100.0 * self.folded / max(n, 1), "sdlogj": self.log_jac.std(),
             "jacobian_min": self.jac_min, "jacobian_max": self.jac_max}
        if self.fx.has_field:
            m["max_displacement_mm"] = math.sqrt(self.max_u2)
        if self.dice is not None:
            d0, d1 = self.dice[0].dice(), self.dice[1].dice()
            m.update({"dice_before": {str(k): v for k, v in d0.items()},
                      "dice_after": {str(k): v for k, v in d1.items()},
                      "dice_mean_before": float(np.nanmean(list(d0.values()))) if d0 else None,
                      "dice_mean_after": float(np.nanmean(list(d1.values()))) if d1 else None})
        if self.inputs.landmarks:
            m.update(_landmark_errors(self.inputs, self.fx))
        return m

    def jacobian_stats(self) -> dict:
        """The whole-volume Jacobian numbers the QA picture lists."""
        return {"min": self.jac_min, "max": self.jac_max, "folding_fraction": self.folded / max(self.log_jac.n, 1),
                "sdlogj": self.log_jac.std()}


def scores(inputs: Inputs, fx: FixedGridResult) -> Scores:
    """The run's :class:`Scores`, filled while ``write`` streams the outputs."""
    return Scores(inputs, fx)


def total_mm_at(fx: FixedGridResult, idx: np.ndarray) -> np.ndarray:
    """``phi(p) - p`` (LPS mm) read at continuous fixed-grid indices ``idx`` ``(N, 3)`` (k, j, i),
    trilinearly between the fixed voxel centres with border padding: the value the displacement
    file gives there."""
    grid = fx.fixed_grid
    hi = np.asarray(grid.shape, dtype=np.float64) - 1
    x = np.clip(np.asarray(idx, dtype=np.float64), 0, hi)
    i0 = np.floor(x).astype(np.int64)
    i0 = np.minimum(i0, np.maximum(hi.astype(np.int64) - 1, 0))
    t = x - i0
    out = np.zeros((len(x), 3))
    for corner in range(8):
        bits = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        c = np.minimum(i0 + bits, hi.astype(np.int64))
        w = np.prod(np.where(bits == 1, t, 1 - t), axis=1)
        out += w[:, None] * _total_mm_at_voxels(fx, c)
    return out


def _total_mm_at_voxels(fx: FixedGridResult, c: np.ndarray) -> np.ndarray:
    p = fx.fixed_grid.index_to_physical(c.astype(np.float64))  # (N, 3) LPS
    q = p
    if fx.u_net_mm is not None:
        net_idx = torch.as_tensor(fx.net.physical_to_index(p).T.reshape(1, 3, -1, 1, 1), dtype=torch.float64)
        u = sample_at(fx.u_net_mm.double(), net_idx, "linear", "border")[0, :, :, 0, 0].T.numpy()
        q = p + u
    q = q @ fx.matrix[:3, :3].T + fx.matrix[:3, 3]
    return q - p


def _landmark_errors(inputs: Inputs, fx: FixedGridResult) -> Dict[str, float]:
    p = inputs.landmarks["fixed_landmarks"]
    q = inputs.landmarks["moving_landmarks"]
    mapped = p + total_mm_at(fx, inputs.fixed_grid.physical_to_index(p))
    return {"tre_before_mm": float(np.linalg.norm(p - q, axis=1).mean()),
            "tre_after_mm": float(np.linalg.norm(mapped - q, axis=1).mean())}
