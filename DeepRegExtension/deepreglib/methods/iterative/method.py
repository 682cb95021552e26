"""The ``iterative`` method: weight-free multi-resolution SVF optimisation on the given pair."""
from __future__ import annotations

from ...core.fields import integrate_velocity
from ...classic.optimise import iterative_register
from ..base import Method, MethodResult, RunContext


class IterativeMethod(Method):
    def run(self, fixed, moving, grid, ctx: RunContext) -> MethodResult:
        v = iterative_register(fixed, moving, progress=ctx.progress, cancel=ctx.cancel)
        return MethodResult(displacement=integrate_velocity(v), velocity=v)
