"""The ``instance`` method: :func:`deepreglib.classic.instance.instance_register` on the pair,
and, on data finer than the network grid, one sparse level at the data's resolution
(:func:`deepreglib.classic.fine.fine_register`).

Method options: ``schedule``, ``balanced`` (default) or ``accurate``
(:data:`~deepreglib.classic.instance.SCHEDULES`); ``similarity``, ``lncc`` (default) or
``mind`` for images of different contrasts (``--contrast different`` sets it); ``fine``,
``auto`` (default: the schedule's fine level, :data:`FINE_LEVELS`, when the data is at least
:data:`FINE_RATIO` finer than the network grid) or ``off``; ``discrete``, the coarse discrete
step of :mod:`deepreglib.classic.convex` (:data:`~deepreglib.classic.instance.CONVEX_STEP`):
``auto`` (default: on MIND-SSC the discrete step alone,
:data:`~deepreglib.classic.instance.DIFFERENT_CONTRAST`, in place of the named schedule; on local
NCC none), ``on`` (the discrete step, then the named schedule's pyramid, for either similarity) or
``off`` (the named schedule alone, also on MIND-SSC).

The grid: the network grid (:meth:`Method.grid_for`, at most ``max_size`` voxels a side), or,
with a fine level, the grid of twice as many voxels a side (never finer than the data). The
pyramid then runs on that grid downsampled back to the network grid's size, and the fine level
on the grid itself. Local NCC only: MIND-SSC has no fine level."""
from __future__ import annotations

import dataclasses
import time

from ...classic.fine import FineLevel, fine_register
from ...classic.instance import CONVEX_STEP, SCHEDULES, SIMILARITIES, instance_register
from ...classic.optimise import _level
from ...core.errors import BadInputError
from ...core.fields import resize_field
from ...core.preprocess import network_grid
from ..base import Method, MethodResult, RunContext

#: The sparse fine level of each schedule (none for the others). Chosen on validation data
#: only (benchmarks/fine_level_study.py --inter: 1 mm OASIS val brains under known deformations,
#: and two inter-subject pairs of them; docs/BENCHMARKS.md, "A sparse fine level"): after the
#: balanced pyramid's 0.96 / 1.05 mm, an endpoint error of 0.40 / 0.43 mm in 6-7 s, the
#: increment smoothed by 5 means with diffusion 2 and no penalty on the whole field (which
#: pulls back the pyramid's field: local NCC of the inter-subject pairs falls below the
#: pyramid's). The price is roughness: SDlogJ in the brains 0.39-0.42 -> 0.46-0.49 on the
#: inter-subject pairs. 5 means instead of 3 (2026-12-07, fifth session): the same endpoint
#: error (0.395 / 0.425 against 0.398 / 0.427 mm), SDlogJ 0.03-0.04 lower, local NCC 0.01 lower
#: (still above the pyramid's); 4 and 6 means lie between and beyond.
#: ``accurate`` scores every foreground voxel, with more steps.
FINE_LEVELS = {"balanced": FineLevel(), "accurate": FineLevel(steps=30, fraction=1.0)}
#: The fine level runs when the network grid's voxels are at least this much coarser than the
#: finer grid's (1 mm brains in a 2 mm network grid: 2).
FINE_RATIO = 1.25
#: Share of the progress bar given to the pyramid when a fine level follows.
PYRAMID_SHARE = 0.7


class InstanceMethod(Method):
    OPTIONS = ("schedule", "similarity", "fine", "discrete")

    def __init__(self, info, device, **options):
        super().__init__(info, device, **options)
        self.schedule_name = str(options.get("schedule", "balanced"))
        if self.schedule_name not in SCHEDULES:
            raise BadInputError(f"schedule must be one of {', '.join(sorted(SCHEDULES))}, got "
                                f"{self.schedule_name!r}")
        self.similarity = str(options.get("similarity", "lncc"))
        if self.similarity not in SIMILARITIES:
            raise BadInputError(f"similarity must be one of {', '.join(SIMILARITIES)} (mind: images of "
                                f"different contrasts), got {self.similarity!r}")
        fine = str(options.get("fine", "auto"))
        if fine not in ("auto", "off"):
            raise BadInputError(f"fine must be auto (the schedule's fine level on data finer than the "
                                f"network grid) or off, got {fine!r}")
        self.fine_level = (FINE_LEVELS.get(self.schedule_name) if fine == "auto" and self.similarity == "lncc"
                           else None)
        self.discrete = str(options.get("discrete", "auto"))
        if self.discrete not in ("auto", "on", "off"):
            raise BadInputError(f"discrete must be auto (on images of different contrasts the discrete step "
                                f"alone), on (the discrete step before the pyramid) or off, got {self.discrete!r}")

    def schedule(self):
        """The schedule that runs (the module docstring's ``discrete`` option)."""
        if self.discrete == "auto" and self.similarity == "mind":
            return SCHEDULES["different"]
        schedule = SCHEDULES[self.schedule_name]
        if self.discrete == "on" and schedule.convex is None:
            schedule = dataclasses.replace(schedule, convex=CONVEX_STEP)
        return schedule

    def grid_for(self, fixed):
        base = network_grid(fixed, self.max_size, self.divisor)
        if self.fine_level is None:
            return base
        fine = network_grid(fixed, 2 * self.max_size, self.divisor)
        return fine if base.spacing[0] >= FINE_RATIO * fine.spacing[0] else base

    def coarse_factor(self, grid) -> float:
        """How much finer ``grid`` is than the network grid (1 for the network grid itself)."""
        return max(1.0, max(grid.shape) / float(self.max_size))

    def run(self, fixed, moving, grid, ctx: RunContext) -> MethodResult:
        schedule = self.schedule()
        ran = "different" if schedule is SCHEDULES["different"] else self.schedule_name
        info = {"schedule": ran, "similarity": self.similarity,
                "discrete": schedule.convex is not None,
                "gradient_steps": any(schedule.steps)}
        factor = self.coarse_factor(grid)
        if self.fine_level is None or factor < FINE_RATIO:
            u = instance_register(fixed, moving, schedule=schedule, similarity=self.similarity,
                                  progress=ctx.progress, cancel=ctx.cancel)
            return MethodResult(displacement=u, info=info)
        progress = ctx.progress
        pyramid_progress = None if progress is None else (lambda f, m: progress(PYRAMID_SHARE * f, m))
        fine_progress = None if progress is None else (
            lambda f, m: progress(PYRAMID_SHARE + (1 - PYRAMID_SHARE) * f, m))
        t = time.perf_counter()
        u = instance_register(_level(fixed, factor), _level(moving, factor), schedule=schedule,
                              similarity=self.similarity, progress=pyramid_progress, cancel=ctx.cancel)
        pyramid_s = time.perf_counter() - t
        u, fine = fine_register(fixed, moving, resize_field(u, fixed.shape[2:]), self.fine_level,
                                progress=fine_progress, cancel=ctx.cancel)
        info["fine_level"] = {**fine, "coarse_factor": round(factor, 3), "pyramid_s": round(pyramid_s, 2),
                              "fine_s": round(time.perf_counter() - t - pyramid_s, 2)}
        return MethodResult(displacement=u, info=info)
