"""The ``instance`` method: :func:`deepreglib.classic.instance.instance_register` on the pair.

Method options: ``schedule``, ``balanced`` (default) or ``accurate``
(:data:`~deepreglib.classic.instance.SCHEDULES`); ``similarity``, ``lncc`` (default) or
``mind`` for images of different contrasts (``--contrast different`` sets it)."""
from __future__ import annotations

from ...classic.instance import SCHEDULES, SIMILARITIES, instance_register
from ...core.errors import BadInputError
from ..base import Method, MethodResult, RunContext


class InstanceMethod(Method):
    OPTIONS = ("schedule", "similarity")

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

    def run(self, fixed, moving, grid, ctx: RunContext) -> MethodResult:
        u = instance_register(fixed, moving, schedule=SCHEDULES[self.schedule_name],
                              similarity=self.similarity, progress=ctx.progress, cancel=ctx.cancel)
        return MethodResult(displacement=u, info={"schedule": self.schedule_name, "similarity": self.similarity})
