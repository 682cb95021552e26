"""Run the engine's worker in the background and read its progress (DESIGN.md, "Worker protocol").

The worker is ``python -m deepreglib register ... --progress json``: one JSON object per line on
stdout (events ``progress``, ``log``, ``result``, ``error``), exit codes 0 done, 2 bad input,
3 cancelled, anything else internal. :class:`WorkerProcess` starts it with ``subprocess.Popen``
in its own process group (POSIX session; Windows new process group) so that cancelling can end
the whole tree, including anything the worker started. Two reader threads turn stdout into
events on a queue and keep the tail of stderr; the GUI drains the queue with :meth:`poll` from a
``qt.QTimer``, so nothing here blocks Slicer's event loop and nothing here needs Qt.

Why not ``slicer.util.launchConsoleProcess(blocking=False)``: it merges stderr into stdout and
starts the child in Slicer's own process group, so Cancel could not end the worker's children
and a Python warning could not be told apart from a protocol line.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Sequence

from deepreglib.io.protocol import (EVENT_ERROR, EVENT_LOG, EVENT_PROGRESS, EVENT_RESULT,  # noqa: F401
                                    ERROR_BAD_INPUT, EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_INTERNAL, EXIT_OK)
from deepreglib.io.protocol import CLASSIC_INIT_CHOICES as CLASSIC_INITIALIZATIONS  # noqa: F401
from deepreglib.methods.registry import initialization_choices  # noqa: F401 (torch-free)

#: Windows has no polite SIGTERM for a console child of a GUI program: the tree is ended at once
#: (``taskkill /T /F``). Nothing is lost: the worker writes its outputs under a temporary name
#: and the caller removes the run's temporary folder.
_IS_WINDOWS = os.name == "nt"

#: Seconds between the polite stop (SIGTERM: the worker cleans up and exits 3) and SIGKILL.
DEFAULT_GRACE_SECONDS = 5.0
#: Lines of stderr kept for the crash report.
STDERR_TAIL_LINES = 40


@dataclass
class WorkerOutcome:
    """How a finished run ended.

    Attributes:
        status: ``done``, ``bad_input``, ``cancelled`` or ``failed``.
        message: one or two sentences for the user (never a bare traceback).
        returncode: the process exit code (negative: killed by that signal on POSIX).
        manifest: absolute path of ``manifest.json`` when ``status == "done"``.
        details: the worker's stderr tail and debug log, for the "details" part of a message box.
    """

    status: str
    message: str
    returncode: Optional[int]
    manifest: Optional[str] = None
    details: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "done"


def default_python() -> str:
    """The interpreter for the worker: Slicer's ``PythonSlicer`` launcher when there is one (it
    sets up Slicer's library paths), else this interpreter."""
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = os.path.join(os.path.dirname(sys.executable), name)
        if os.path.isfile(candidate):
            return candidate
    found = shutil.which("PythonSlicer")
    return found or sys.executable


def parse_method_options(text: str) -> Dict[str, str]:
    """``"query_point=[1,2,3]; uncertainty_samples=16"`` (``;`` or new lines between options)
    -> ``{"query_point": "[1,2,3]", "uncertainty_samples": "16"}``; the worker reads each value
    as JSON when it parses and checks that the method has the option.

    Raises:
        ValueError: an item without ``=`` or without a name.
    """
    options: Dict[str, str] = {}
    for item in (text or "").replace("\n", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"method options are KEY=VALUE separated by ';', got {item!r}")
        options[key.strip()] = value.strip()
    return options


def format_method_options(options: Optional[Dict[str, object]]) -> str:
    """The inverse of :func:`parse_method_options`: ``{"schedule": "balanced", "seed": 3}`` ->
    ``"schedule=balanced; seed=3"`` (strings as they are, other values as JSON)."""
    return "; ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in (options or {}).items())


#: The preset choice that means "no preset: the method, alignment and options as given".
PRESET_CUSTOM = "custom"


def register_command(fixed: str, moving: str, out: str, method: str, python: Optional[str] = None,
                     device: str = "auto", refine: int = 0, init: str = "none",
                     options: Optional[Dict[str, Optional[str]]] = None,
                     flags: Sequence[str] = (),
                     method_options: Optional[Dict[str, object]] = None,
                     preset: Optional[str] = None) -> List[str]:
    """The worker's command line.

    Args:
        fixed, moving, out: paths (``out`` must be new or empty; the worker checks).
        method: a :data:`deepreglib.methods.registry.METHODS` name; not used with a ``preset``.
        preset: a :data:`deepreglib.methods.presets.PRESETS` name: ``--preset NAME`` and neither
            ``--method`` nor ``--init`` (the preset chooses alignment, method and its options);
            ``refine`` and ``method_options`` are passed only when given (the worker adds them
            to the preset's). ``None`` or :data:`PRESET_CUSTOM`: ``--method``, ``--init`` and
            ``--refine`` as given (the behaviour before presets).
        options: more ``--name value`` pairs by CLI name without dashes, e.g.
            ``{"fixed-mask": path, "moving-landmarks": path, "initial-transform": path}``;
            ``None`` values are left out.
        flags: bare flags such as ``"no-qa"``.
        method_options: the method's own options, each as ``--method-option KEY=VALUE``;
            strings are passed as they are, other values as JSON (``[1.0, 2.0, 3.0]``).
    """
    if int(refine) < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    cmd = [python or default_python(), "-m", "deepreglib", "register", "--fixed", str(fixed),
           "--moving", str(moving), "--out", str(out)]
    if preset and preset != PRESET_CUSTOM:
        cmd += ["--preset", str(preset), "--device", str(device)]
        if int(refine):
            cmd += ["--refine", str(int(refine))]
        cmd += ["--progress", "json"]
    else:
        cmd += ["--method", str(method), "--device", str(device), "--refine", str(int(refine)),
                "--init", str(init), "--progress", "json"]
    for name, value in (options or {}).items():
        if value is not None and value != "":
            cmd += [f"--{name}", str(value)]
    for key, value in (method_options or {}).items():
        text = value if isinstance(value, str) else json.dumps(value)
        cmd += ["--method-option", f"{key}={text}"]
    cmd += [f"--{f}" for f in flags]
    return cmd


def worker_command(command: str, arguments: Sequence[str] = (), python: Optional[str] = None,
                   progress: bool = True) -> List[str]:
    """``python -m deepreglib COMMAND ARGUMENTS [--progress json]``: any worker command, e.g.
    ``worker_command("devices", ["--json"], progress=False)`` or ``worker_command("qa", [...])``."""
    cmd = [python or default_python(), "-m", "deepreglib", command] + [str(a) for a in arguments]
    return cmd + (["--progress", "json"] if progress else [])


def _last_meaningful_line(lines: Sequence[str]) -> str:
    """The line that says what went wrong: the last non-empty line that is not a warning's
    source echo (the exception line of a traceback, or a fatal message)."""
    for line in reversed(lines):
        s = line.strip()
        if s and not s.startswith(("File ", "^", "~")) and "Warning" not in s:
            return s
    return ""


class WorkerProcess:
    """One background run of a command that speaks the worker protocol.

    Use::

        w = WorkerProcess(register_command(...), env=...)
        w.start()
        # from a QTimer every ~100 ms:
        for event in w.poll(): ...        # dicts: {"event": "progress", "fraction": ...}, ...
        if w.finished: outcome = w.outcome()
        # Cancel button:
        w.cancel()

    Lines on stdout that are not JSON objects with an ``event`` key become
    ``{"event": "log", "level": "info", "message": line}``; stderr lines become
    ``{"event": "log", "level": "stderr", ...}`` and the last :data:`STDERR_TAIL_LINES` are
    kept for the outcome's ``details``.
    """

    def __init__(self, args: Sequence[str], env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None, grace_seconds: float = DEFAULT_GRACE_SECONDS):
        if not args:
            raise ValueError("args must name a program")
        if grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {grace_seconds}")
        self.args = [str(a) for a in args]
        self.env = env
        self.cwd = cwd
        self.grace_seconds = float(grace_seconds)
        self._proc: Optional[subprocess.Popen] = None
        self._events: "queue.Queue[dict]" = queue.Queue()
        self._stderr_tail: Deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._threads: List[threading.Thread] = []
        self._cancel_requested = False
        self._error_event: Optional[dict] = None
        self._result_event: Optional[dict] = None
        self._debug: List[str] = []
        self.fraction = 0.0
        self.stage = ""

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "WorkerProcess":
        """Start the process; returns at once. Raises ``RuntimeError`` if already started and
        ``OSError`` (with the program's name) if it cannot be executed."""
        if self._proc is not None:
            raise RuntimeError("this worker was already started; make a new WorkerProcess")
        kwargs = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      env=self.env, cwd=self.cwd, bufsize=1, universal_newlines=True,
                      encoding="utf-8", errors="replace")
        if _IS_WINDOWS:
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # no console window pops up
            kwargs.update(startupinfo=info, creationflags=subprocess.CREATE_NEW_PROCESS_GROUP)
        else:
            kwargs.update(start_new_session=True)  # own process group: cancel ends the tree
        try:
            self._proc = subprocess.Popen(self.args, **kwargs)
        except OSError as e:
            raise OSError(f"cannot start the registration worker {self.args[0]!r}: {e}") from e
        for target, stream in ((self._read_stdout, self._proc.stdout),
                               (self._read_stderr, self._proc.stderr)):
            t = threading.Thread(target=target, args=(stream,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def finished(self) -> bool:
        """The process has exited and both output streams are fully read."""
        return (self._proc is not None and self._proc.poll() is not None
                and not any(t.is_alive() for t in self._threads))

    @property
    def returncode(self) -> Optional[int]:
        return self._proc.poll() if self._proc is not None else None

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Block until the process exits and its output is read (tests and the console API;
        the GUI polls instead). Returns the exit code, or ``None`` on timeout."""
        if self._proc is None:
            raise RuntimeError("the worker was not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._proc.returncode

    # -- reading -----------------------------------------------------------------------------
    def _read_stdout(self, stream) -> None:
        for line in iter(stream.readline, ""):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            event = None
            if line.lstrip().startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
            if not isinstance(event, dict) or "event" not in event:
                event = {"event": "log", "level": "info", "message": line}
            self._events.put(event)
        stream.close()

    def _read_stderr(self, stream) -> None:
        for line in iter(stream.readline, ""):
            line = line.rstrip("\r\n")
            if line.strip():
                self._stderr_tail.append(line)
                self._events.put({"event": "log", "level": "stderr", "message": line})
        stream.close()

    def poll(self, max_events: int = 1000) -> List[dict]:
        """The events that arrived since the last call (never blocks). Also updates
        :attr:`fraction` and :attr:`stage` and remembers ``result``/``error`` events."""
        events = []
        while len(events) < max_events:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            kind = event.get("event")
            if kind == "progress":
                try:
                    self.fraction = max(self.fraction, min(1.0, float(event.get("fraction", 0.0))))
                except (TypeError, ValueError):
                    pass
                self.stage = str(event.get("stage", self.stage))
            elif kind == "result":
                self._result_event = event
            elif kind == "error":
                self._error_event = event
            elif kind == "log" and event.get("level") == "debug":
                self._debug.append(str(event.get("message", "")))
            events.append(event)
        return events

    # -- cancelling --------------------------------------------------------------------------
    def cancel(self, grace_seconds: Optional[float] = None, block: bool = True) -> None:
        """End the worker and everything it started.

        POSIX: SIGTERM to the process group (the worker stops at its next check, removes partial
        output and exits 3), then SIGKILL to the group after ``grace_seconds``. Windows:
        ``taskkill /T /F`` at once (see :data:`_IS_WINDOWS`). With ``block=False`` the SIGKILL is sent from a
        background thread so a GUI button returns at once.
        """
        if self._proc is None:
            return
        self._cancel_requested = True
        grace = self.grace_seconds if grace_seconds is None else float(grace_seconds)
        if block:
            self._terminate_tree(grace)
        else:
            threading.Thread(target=self._terminate_tree, args=(grace,), daemon=True).start()

    def _terminate_tree(self, grace: float) -> None:
        proc = self._proc
        if _IS_WINDOWS:
            self._taskkill()
            try:
                proc.wait(grace + 5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
            return
        pgid = proc.pid  # start_new_session: the worker leads its own group
        self._signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        # Also after a clean exit: a child the worker started may still be in the group.
        self._signal_group(pgid, signal.SIGKILL)
        try:
            proc.wait(grace + 5.0)
        except subprocess.TimeoutExpired:
            pass

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already

    def _taskkill(self) -> None:
        """End the worker and every process it started, at once (``/F``: a console program
        without a window ignores the polite ``taskkill``, which would only wait out the grace
        period)."""
        cmd = ["taskkill", "/PID", str(self._proc.pid), "/T", "/F"]
        try:
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        except (OSError, subprocess.SubprocessError):
            self._proc.kill()

    # -- outcome -------------------------------------------------------------------------------
    def outcome(self) -> WorkerOutcome:
        """How the run ended; call after :attr:`finished` (or :meth:`wait`). Drains pending
        events first so the ``result``/``error`` events are seen."""
        if self._proc is None:
            raise RuntimeError("the worker was not started")
        code = self._proc.poll()
        if code is None:
            raise RuntimeError("the worker is still running")
        while True:
            if not self.poll():
                break
        details = "\n".join(self._debug + list(self._stderr_tail))
        err = self._error_event
        if code == EXIT_OK and self._result_event is not None:
            manifest = str(self._result_event.get("manifest", ""))
            if manifest and not os.path.isabs(manifest):
                manifest = os.path.abspath(os.path.join(self.cwd or os.getcwd(), manifest))
            return WorkerOutcome("done", "Registration finished.", code, manifest, details)
        if code == EXIT_CANCELLED or (self._cancel_requested and code != EXIT_OK):
            return WorkerOutcome("cancelled", "Registration cancelled; no results were added.",
                                 code, None, details)
        if (err is not None and err.get("kind") == "bad_input") or code == EXIT_BAD_INPUT:
            msg = str(err.get("message")) if err else _last_meaningful_line(self._stderr_tail)
            return WorkerOutcome("bad_input", msg or "The worker rejected its input.", code, None,
                                 details)
        if err is not None:
            return WorkerOutcome("failed", "The registration failed: " + str(err.get("message", "")),
                                 code, None, details)
        if code == EXIT_OK:
            return WorkerOutcome("failed", "The worker finished without reporting a result "
                                 "(is it the deepreglib worker?).", code, None, details)
        return WorkerOutcome("failed", self._crash_message(code), code, None, details)

    def _crash_message(self, code: int) -> str:
        if code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
            if -code == getattr(signal, "SIGKILL", 9):
                how += " (often: the system ran out of memory; try a smaller image or the CPU)"
        else:
            how = f"stopped with exit code {code}"
        last = _last_meaningful_line(self._stderr_tail)
        return (f"The registration worker {how}." + (f" Its last message: {last}" if last else "")
                + " See the details for its output.")


def worker_environment(module_dir: str, models_dir: Optional[str] = None) -> Dict[str, str]:
    """The worker's environment: Slicer's startup environment (inside Slicer; else ours), the
    folder holding ``deepreglib`` first on ``PYTHONPATH`` (PythonSlicer does not search the
    extension's module folder by itself) and ``DEEPREG_MODELS`` naming the one folder of
    shipped weights (``models_dir``), unless the user set it."""
    env = None
    try:
        import slicer
        if getattr(slicer, "app", None) is not None:
            env = slicer.util.startupEnvironment()
    except Exception:  # noqa: BLE001 - outside Slicer, or an older Slicer: inherit ours
        env = None
    env = dict(env if env is not None else os.environ)
    paths = [module_dir] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if models_dir and os.path.isdir(models_dir) and not env.get("DEEPREG_MODELS"):
        env["DEEPREG_MODELS"] = models_dir
    return env


def temp_root() -> Optional[str]:
    """Slicer's temporary folder inside the application, else the system's (``None``)."""
    try:
        import slicer
        return slicer.app.temporaryPath
    except (ImportError, AttributeError):
        return None


class BackgroundRun:
    """A started worker command and its temporary folder. The GUI polls it from a timer and may
    cancel it; :meth:`finish` then loads the results with ``load(manifest_path)`` when the run
    succeeded (and was not discarded) and removes the temporary folder unless it is kept."""

    def __init__(self, worker: WorkerProcess, temp_dir: str, load, keep_temp: bool = False,
                 messages: Sequence[str] = ()):
        self.worker = worker
        self.temp_dir = temp_dir
        self.keep_temp = keep_temp
        self.messages = list(messages)
        self.discard = False
        self.outcome: Optional[WorkerOutcome] = None
        self.results = None
        self._load = load

    def poll(self) -> List[dict]:
        return self.worker.poll()

    def cancel(self, discard: bool = False, block: bool = False) -> None:
        """Stop the worker and its children. ``discard``: load nothing even if it had already
        finished (its input nodes are going away)."""
        self.discard = self.discard or discard
        self.worker.cancel(block=block)

    def wait_for_results(self, timeout: Optional[float], what: str = "the computation"):
        """Block until the run ends (console, scripts, self-tests) and return its loaded results.

        Raises:
            RuntimeError: with the worker's message when the run did not succeed, or when it took
                longer than ``timeout`` seconds (it is then cancelled).
        """
        if self.worker.wait(timeout) is None:
            self.cancel(block=True)
            self.finish()
            raise RuntimeError(f"{what} took longer than {timeout} s and was cancelled")
        results = self.finish()
        if not self.outcome.ok:
            raise RuntimeError(self.outcome.message)
        return results

    def finish(self):
        """The loaded results if the run succeeded, else None (see :attr:`outcome` for how it
        ended). Removes the temporary folder unless it is kept."""
        try:
            self.outcome = self.worker.outcome()
            if self.outcome.ok and not self.discard:
                self.results = self._load(self.outcome.manifest)
            return self.results
        finally:
            if not self.keep_temp:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
