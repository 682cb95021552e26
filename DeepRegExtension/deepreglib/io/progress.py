"""Progress reporting of the worker (DESIGN.md, "Worker protocol").

``--progress json``: one JSON object per line on stdout, flushed at once, e.g.
``{"event": "progress", "stage": "inference", "fraction": 0.4, "message": "..."}``; events are
``progress``, ``log``, ``result`` and ``error``. ``--progress bar``: a text bar on stderr for
people, and the result path on stdout. ``fraction`` is the whole run's progress (0..1); each
stage has a fixed share of it (:data:`STAGES`).
"""
from __future__ import annotations

import json
import sys
import time
from typing import Dict, Optional, TextIO

#: Share of the whole run given to each stage, in order.
STAGES: Dict[str, float] = {"read": 0.05, "initialize": 0.10, "preprocess": 0.05,
                            "inference": 0.30, "refine": 0.30, "write": 0.20}


class Reporter:
    """Base reporter: tracks overall fraction from (stage, stage_fraction)."""

    def __init__(self, stages: Optional[Dict[str, float]] = None):
        self.stages = dict(stages or STAGES)
        total = sum(self.stages.values())
        self._start = {}
        acc = 0.0
        for name, share in self.stages.items():
            self._start[name] = acc / total
            acc += share
        self._total = total
        self.fraction = 0.0

    def overall(self, stage: str, fraction: float) -> float:
        if stage not in self.stages:
            return self.fraction
        f = self._start[stage] + max(0.0, min(1.0, fraction)) * self.stages[stage] / self._total
        self.fraction = max(self.fraction, f)  # never goes backwards
        return self.fraction

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        raise NotImplementedError

    def log(self, message: str, level: str = "info") -> None:
        raise NotImplementedError

    def result(self, manifest: str) -> None:
        raise NotImplementedError

    def error(self, kind: str, message: str) -> None:
        raise NotImplementedError


class JsonReporter(Reporter):
    def __init__(self, stream: TextIO = None, stages=None):
        super().__init__(stages)
        self.stream = stream or sys.stdout

    def _emit(self, obj) -> None:
        self.stream.write(json.dumps(obj) + "\n")
        self.stream.flush()

    def progress(self, stage, fraction, message=""):
        self._emit({"event": "progress", "stage": stage, "fraction": round(self.overall(stage, fraction), 4),
                    "stage_fraction": round(float(fraction), 4), "message": message})

    def log(self, message, level="info"):
        self._emit({"event": "log", "level": level, "message": message})

    def result(self, manifest):
        self._emit({"event": "progress", "stage": "done", "fraction": 1.0, "message": "done"})
        self._emit({"event": "result", "manifest": manifest})

    def error(self, kind, message):
        self._emit({"event": "error", "kind": kind, "message": message})


class BarReporter(Reporter):
    """A one-line progress bar on stderr for people at a terminal."""

    def __init__(self, stream: TextIO = None, stages=None, width: int = 30):
        super().__init__(stages)
        self.stream = stream or sys.stderr
        self.width = width
        self.t0 = time.time()

    def progress(self, stage, fraction, message=""):
        f = self.overall(stage, fraction)
        n = int(round(f * self.width))
        self.stream.write(f"\r[{'#' * n}{'.' * (self.width - n)}] {100 * f:5.1f}% "
                          f"{time.time() - self.t0:6.1f}s {stage}: {message[:40]:<40}")
        self.stream.flush()

    def log(self, message, level="info"):
        self.stream.write(f"\n{level}: {message}\n")
        self.stream.flush()

    def result(self, manifest):
        self.progress("write", 1.0, "done")
        self.stream.write("\n")
        print(manifest, flush=True)

    def error(self, kind, message):
        self.stream.write(f"\nerror ({kind}): {message}\n")
        self.stream.flush()


class SilentReporter(Reporter):
    def progress(self, stage, fraction, message=""):
        self.overall(stage, fraction)

    def log(self, message, level="info"):
        pass

    def result(self, manifest):
        pass

    def error(self, kind, message):
        pass
