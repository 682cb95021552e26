"""What every stage of a run shares: the reporter, the cancel flag, the stage timer and the
messages for the manifest."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

from ..core.errors import CancelledError
from ..io.progress import Reporter, SilentReporter
from ..methods.base import RunContext


class Session:
    """One run's shared state. ``stage(name)`` times a stage (seconds add up per name)."""

    def __init__(self, reporter: Optional[Reporter] = None, cancel: Callable[[], bool] = lambda: False):
        self.reporter = reporter or SilentReporter()
        self.cancel = cancel
        self.timings: Dict[str, float] = {}
        self.messages: List[str] = []
        #: sections a stage adds to the manifest (e.g. ``alignment``)
        self.details: Dict[str, object] = {}
        self.started = time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def check(self) -> None:
        """Raise CancelledError when the user asked to stop."""
        if self.cancel():
            raise CancelledError("registration cancelled")

    def warn(self, message: str) -> None:
        self.messages.append(message)
        self.reporter.log(message, "warning")

    def context(self, stage: str) -> RunContext:
        """The callbacks a method or an optimiser gets for ``stage``: progress checks cancel."""
        def progress(fraction, message=""):
            self.check()
            self.reporter.progress(stage, fraction, message)
        return RunContext(progress=progress, cancel=self.cancel)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
