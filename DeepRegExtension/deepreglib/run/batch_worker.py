"""One pair of a batch, as a worker process runs it (:mod:`deepreglib.run.batch`): the same
:func:`deepreglib.run.pipeline.register` as ``deepreg register``, in a long-lived process (a
local worker of ``--jobs``, or a Dask worker), so the network weights are read once per process
(:func:`deepreglib.io.models.read_weights_cached`).

Where a pair is written, inside the batch folder ``DIR``::

    DIR/.staging/.ID.partial/   register's own temporary folder (staged_folder, locked while written)
    DIR/.staging/ID/            register's finished output; batch_pair.json (the fingerprint) is added
    DIR/ID/                     the same folder renamed into place: complete, or absent

so ``DIR/ID`` never holds a half-written result, and a result whose ``batch_pair.json`` carries
the pair's fingerprint is one made from the same inputs and options (resumed batches skip it).

Cancellation: a local worker turns SIGTERM into :class:`CancelledError` inside the run (as the
single-run worker does, ``deepreglib.cli``), ignores SIGINT (its coordinator decides), and
cancels itself when its coordinator disappears; a Dask task polls a named ``distributed.Event``.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Tuple

from ..core.errors import BadInputError, CancelledError
from ..io import protocol as P

#: the record of the pair beside its manifest: id, fingerprint, the table's cells, attempt
PAIR_RECORD = "batch_pair.json"
PAIR_RECORD_FORMAT = "deepreg-batch-pair/1"
#: the batch's working folder inside DIR (removed when nothing runs)
STAGING = ".staging"

#: set by SIGTERM in a local worker; the run's cancel callback reads it
_CANCEL_REQUESTED = []
#: True while a local worker runs a pair (a SIGTERM between pairs just ends the process)
_RUNNING = []
_LOCAL_WORKER = []


def pair_complete(folder: Path, fingerprint: str) -> Tuple[bool, str]:
    """Whether ``folder`` is a pair's complete output made with ``fingerprint``; ``(False,
    why)`` otherwise."""
    record = folder / PAIR_RECORD
    if not record.is_file():
        return False, f"it has no {PAIR_RECORD} (not written by deepreg batch, or incomplete)"
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        manifest = P.read_manifest(folder / P.MANIFEST_NAME)
    except (OSError, ValueError) as e:
        return False, f"its manifest or {PAIR_RECORD} cannot be read ({e})"
    if data.get("fingerprint") != fingerprint:
        return False, "it was made from other inputs or options (the files or the row changed)"
    if manifest.get("status") != "done":
        return False, f"its manifest says status {manifest.get('status')!r}"
    missing = [o["path"] for o in manifest["outputs"] if not (folder / o["path"]).exists()]
    if missing:
        return False, f"outputs listed in its manifest are missing: {', '.join(missing[:5])}"
    return True, ""


def write_json_atomic(path: Path, data) -> None:
    """``path`` written whole or not at all (a temporary name beside it, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
        os.replace(str(tmp), str(path))
    finally:
        if tmp.exists():
            tmp.unlink()


# -- local worker processes (--jobs) ------------------------------------------------------------
def _on_sigterm(signum, frame):
    """As ``deepreglib.cli._on_sigterm``, and between pairs the process just ends."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: cleanup must not be interrupted again
    _CANCEL_REQUESTED.append(signum)
    if not _RUNNING:
        os._exit(P.EXIT_CANCELLED)
    raise CancelledError("cancelled by signal %d" % signum)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists
        return True
    return True


def _watch_parent(coordinator: int) -> None:
    """End this worker (as by SIGTERM: its pair cleans up) when the coordinator has gone, e.g.
    killed with SIGKILL: no orphan keeps running. Gone: the coordinator's pid no longer exists,
    or this process was handed to another parent (its own parent, the coordinator or the fork
    server, ended)."""
    parent = os.getppid()
    while True:
        time.sleep(1.0)
        if os.getppid() != parent or not _alive(coordinator):
            os.kill(os.getpid(), signal.SIGTERM)
            return


def init_local_worker(threads: int, parent: int) -> None:
    """Initializer of a ``--jobs`` worker process: torch threads, signals, the parent watch."""
    from .cpu_policy import apply_wait_policy
    apply_wait_policy(threads)  # before torch loads: sleep, not spin, when the cores are shared
    import torch
    torch.set_num_threads(max(1, int(threads)))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the coordinator decides
    signal.signal(signal.SIGTERM, _on_sigterm)
    if hasattr(signal, "SIGXFSZ"):  # a file-size limit makes writes fail (EFBIG), not kill us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _LOCAL_WORKER.append(True)
    if hasattr(os, "getppid") and os.name != "nt":
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="deepreg-parent-watch").start()


def _reset_peak_memory() -> None:
    """Make the manifest's peak RAM this pair's, not the process's so far (Linux: resets the
    high-water mark that ``getrusage`` reports; elsewhere nothing)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# -- Dask workers (--scheduler) -----------------------------------------------------------------
def _dask_worker():
    try:
        from distributed import get_worker
        return get_worker()
    except (ImportError, ValueError):
        return None


def _dask_cancel(name: str, every_s: float = 1.0) -> Callable[[], bool]:
    """A cancel callback reading the batch's ``distributed.Event`` (at most once a second)."""
    from distributed import Event
    event = Event(name)
    state = {"checked": 0.0, "set": False}

    def cancel() -> bool:
        now = time.monotonic()
        if not state["set"] and now - state["checked"] >= every_s:
            state["checked"] = now
            try:
                state["set"] = bool(event.is_set())
            except Exception:  # noqa: BLE001 - scheduler gone: the cluster is closing
                state["set"] = True
        return state["set"]
    return cancel


def cpu_cores() -> int:
    """The cores this process may use (its CPU affinity where the system says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _worker_threads(worker, by_worker: Optional[dict] = None) -> int:
    """Torch threads for a pair on a Dask worker: the coordinator's count for it (its node's
    cores over all the tasks the node runs at once), else its cores over its own threads."""
    if by_worker and getattr(worker, "address", None) in by_worker:
        return int(by_worker[worker.address])
    nthreads = getattr(worker, "nthreads", None) or 1
    return max(1, cpu_cores() // int(nthreads))


# -- one pair ---------------------------------------------------------------------------------
def _announce(worker, task: dict, result: dict) -> None:
    """On Dask, tell the coordinator that the pair started (its progress bar; best effort)."""
    if worker is None or not task.get("topic"):
        return
    try:
        worker.log_event(task["topic"], {"pair": task["id"], "state": "started", "attempt": result["attempt"],
                                         "pid": os.getpid(), "host": result["host"]})
    except Exception:  # noqa: BLE001 - progress only
        pass


def _publish(task: dict, result: dict, stage_out: Path, final: Path, seconds: float) -> None:
    """Write the pair's record into its finished staging folder, then rename the folder to
    ``DIR/ID`` (atomic on one file system). Another attempt that finished first wins."""
    write_json_atomic(stage_out / PAIR_RECORD, {
        "format": PAIR_RECORD_FORMAT, "id": task["id"], "fingerprint": task["fingerprint"],
        "attempt": result["attempt"], "seconds": seconds,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "worker": {"pid": os.getpid(), "host": result["host"], "threads": result["threads"]},
        "cells": task.get("cells", {}), "options": task["options"]})
    try:
        os.rename(str(stage_out), str(final))
    except OSError:
        if not pair_complete(final, task["fingerprint"])[0]:
            raise
        shutil.rmtree(str(stage_out), ignore_errors=True)


def run_pair(task: dict) -> dict:
    """Register one pair of a batch into ``DIR/ID`` (module docstring). ``task``: ``id``,
    ``out_dir``, ``options`` (RegisterOptions fields), ``fingerprint``, ``attempt``,
    ``threads`` (None: decided here), ``cells``, ``cancel_event`` (Dask), ``topic`` (Dask: where
    to say the pair started). Never raises for a failed pair: returns a dict with ``status``
    ``done``, ``failed`` (``kind`` ``bad_input`` or ``internal``, ``error``) or ``cancelled``."""
    from ..io.models import WEIGHT_FILE_READS
    from ..io.progress import SilentReporter
    from .pipeline import RegisterOptions, register
    t0 = time.perf_counter()
    pid = task["id"]
    out_dir = Path(task["out_dir"])
    final, staging = out_dir / pid, out_dir / STAGING
    stage_out = staging / pid
    worker = None if _LOCAL_WORKER else _dask_worker()
    threads = task.get("threads") or (_worker_threads(worker, task.get("threads_by_worker"))
                                      if worker is not None else None)
    result = {"id": pid, "attempt": task.get("attempt", 1), "pid": os.getpid(), "host": socket.gethostname(),
              "threads": threads}
    _announce(worker, task, result)
    done, _why = pair_complete(final, task["fingerprint"])
    if done:  # e.g. a task Dask ran again after its worker died just after the rename
        return dict(result, status="done", seconds=0.0, reused=True)
    if worker is not None and task.get("cancel_event"):
        cancel = _dask_cancel(task["cancel_event"])
    else:
        cancel = lambda: bool(_CANCEL_REQUESTED)  # noqa: E731
    if _LOCAL_WORKER and threading.current_thread() is threading.main_thread():
        # register's point of no return ignores SIGTERM for the rest of the process: take it back
        signal.signal(signal.SIGTERM, _on_sigterm)
    if _LOCAL_WORKER or getattr(worker, "nthreads", 1) == 1:
        _reset_peak_memory()
    _RUNNING.append(pid)
    try:
        staging.mkdir(parents=True, exist_ok=True)
        if stage_out.exists():  # a killed attempt's finished but unmoved result
            shutil.rmtree(str(stage_out))
        opts = RegisterOptions(out=str(stage_out), threads=threads, **task["options"])
        register(opts, SilentReporter(), cancel=cancel)
        seconds = time.perf_counter() - t0
        _publish(task, result, stage_out, final, seconds)
        return dict(result, status="done", seconds=seconds, weight_file_reads=sum(WEIGHT_FILE_READS.values()))
    except CancelledError as e:
        shutil.rmtree(str(stage_out), ignore_errors=True)
        return dict(result, status="cancelled", error=str(e) or "cancelled")
    except BadInputError as e:
        shutil.rmtree(str(stage_out), ignore_errors=True)
        return dict(result, status="failed", kind=P.ERROR_BAD_INPUT, error=str(e),
                    seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a crashed pair is recorded; the batch goes on
        shutil.rmtree(str(stage_out), ignore_errors=True)
        return dict(result, status="failed", kind=P.ERROR_INTERNAL, error=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc()[-4000:], seconds=time.perf_counter() - t0)
    finally:
        _RUNNING.clear()
