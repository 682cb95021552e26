"""``deepreg batch``: a cohort of registrations, one per pair, on this machine's cores or on a
Dask cluster, resumable, with a summary at the end.

Each pair runs :func:`deepreglib.run.pipeline.register` (the code path of ``deepreg register``)
in a long-lived worker process (:func:`deepreglib.run.batch_worker.run_pair`) and lands in
``DIR/<id>/`` whole or not at all. What the batch folder holds::

    DIR/<id>/            one pair's outputs, manifest.json and batch_pair.json (its fingerprint)
    DIR/batch.json       the batch: settings, and each pair's status, attempts and error
    DIR/summary.csv      one row per pair (metrics, timings, memory from its manifest)
    DIR/summary.png      distributions over the pairs, outliers named (report/batch_summary.py)
    DIR/.batch.lock      held (an OS lock, with the pid written in it) while a batch runs here
    DIR/.staging/        pairs being written (removed when nothing runs)

Where the pairs run:

* ``--jobs N`` (default 1): N worker processes here (spawned, so the same on every OS), each
  with ``--threads`` torch threads, by default the machine's cores over N (at least 1).
* ``--scheduler local:N``: a Dask LocalCluster of N worker processes, 1 thread each;
  ``--scheduler tcp://HOST:PORT``: an existing Dask cluster (``dask scheduler`` /
  ``dask worker tcp://HOST:PORT --nthreads 1``), where every path must be visible to the
  workers. One pair is one task (``client.submit`` / ``as_completed``); a task whose worker
  dies is rerun by Dask on another worker. Workers use ``--device`` as given (``auto`` takes
  a node's GPU when it has one).

A failed pair is retried (``--retries``, default once), then recorded with its error kind
(``bad_input``: the input is at fault; ``internal`` or ``crash``: the engine or the worker
process) and the batch goes on. Run the same command again to resume: pairs whose output is
complete and made with the same fingerprint are skipped, the rest (failed, cancelled, killed)
are done. Ctrl-C or SIGTERM cancels: the workers' runs are cancelled (their temporary folders
removed), the workers end, and the command exits 3.

Exit codes: 0 every pair done, 1 some pair failed (after its retries), 2 bad batch input (the
table, a file, another batch running on DIR), 3 cancelled.
"""
from __future__ import annotations

import datetime
import json
import os
import queue
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TextIO

from ..core.errors import BadInputError
from ..io import protocol as P
from .batch_table import BatchPair
from .batch_worker import PAIR_RECORD, STAGING, cpu_cores, pair_complete, run_pair, write_json_atomic

BATCH_FORMAT = "deepreg-batch/1"
BATCH_FILE = "batch.json"
LOCK_FILE = ".batch.lock"
#: exit code when some pair failed after its retries (a batch that ran: not bad input)
EXIT_PAIRS_FAILED = P.EXIT_INTERNAL
#: error kind of a pair whose worker process died under it (killed, out of memory)
ERROR_CRASH = "crash"
#: seconds a cancelled worker gets to clean up before it is killed
CANCEL_GRACE_S = 20.0


def threads_per_job(jobs: int, threads: Optional[int] = None) -> int:
    """``threads`` when given, else the cores over the jobs: used, not oversubscribed."""
    if threads:
        return max(1, int(threads))
    return max(1, cpu_cores() // max(1, int(jobs)))


@dataclass
class BatchSettings:
    out: str
    jobs: int = 1
    #: torch threads per pair (None: cores // jobs locally; a Dask worker's cores over its threads)
    threads: Optional[int] = None
    #: None: local processes; ``local:N`` or ``tcp://HOST:PORT``: Dask
    scheduler: Optional[str] = None
    retries: int = 1
    #: ``bar`` (stderr), ``json`` (stdout, one object per line) or ``none``
    progress: str = "bar"
    #: draw summary.png
    summary_png: bool = True


# -- the lock on DIR --------------------------------------------------------------------------------
class BatchLock:
    """``DIR/.batch.lock``: an OS lock (released by the OS however the holder ends, so a lock
    left by a killed batch is stale and taken over), with the holder's pid and start time
    written in it for the message a second batch gets. The file is never removed: removing a
    lock file lets two processes lock two different files."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self.fd: Optional[int] = None

    def __enter__(self) -> "BatchLock":
        from ..io.exchange import _try_lock  # the OS lock staged_folder uses (fcntl / msvcrt)
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            try:
                holder = self.path.read_text(encoding="utf-8").strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise BadInputError(f"another deepreg batch is running on {self.path.parent} ({holder}); "
                                "wait for it to finish, or choose another --out")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {_now()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _staging_busy(out: Path) -> List[str]:
    """Pairs whose temporary folder a live process holds (its staged_folder lock)."""
    from ..io.exchange import _LOCK_NAME, _try_lock
    busy = []
    staging = out / STAGING
    for entry in (staging.iterdir() if staging.is_dir() else ()):
        lock = entry / _LOCK_NAME
        if entry.name.endswith(".partial") and lock.is_file():
            try:
                fd = os.open(str(lock), os.O_RDWR)
            except OSError:
                continue
            try:
                if not _try_lock(fd):
                    busy.append(entry.name)
            finally:
                os.close(fd)  # also releases the lock taken just now
    return busy


def clean_staging(out: Path) -> List[str]:
    """Remove what killed or cancelled pairs left in ``DIR/.staging`` (never a folder a live
    process holds), and the temporary files of a killed coordinator's atomic writes
    (``write_json_atomic``'s ``DIR/.NAME.json.tmp-PID-TID``; the caller holds ``DIR``'s lock, so
    no live batch writes them); returns the entries left in place."""
    for tmp in out.glob(".*.json.tmp-*"):
        if tmp.is_file():
            try:
                tmp.unlink()
            except OSError:
                pass
    staging = out / STAGING
    if not staging.is_dir():
        return []
    busy = set(_staging_busy(out))
    for entry in staging.iterdir():
        if entry.name in busy:
            continue
        if entry.is_dir():
            shutil.rmtree(str(entry), ignore_errors=True)
        else:
            entry.unlink()
    try:
        staging.rmdir()
    except OSError:
        pass
    return sorted(busy)


# -- progress ---------------------------------------------------------------------------------------
class BatchProgress:
    """Pair events for people (``bar``: a line on stderr, redrawn on a terminal, one line per
    event otherwise) or machines (``json``: one object per line on stdout, the events of
    :mod:`deepreglib.io.protocol`: ``progress`` with ``stage: "batch"``, ``log``, ``result``)."""

    def __init__(self, mode: str, total: int, stream: Optional[TextIO] = None):
        self.mode, self.total = mode, total
        self.stream = stream or (sys.stdout if mode == "json" else sys.stderr)
        self.tty = mode == "bar" and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()
        self.counts = {"done": 0, "failed": 0, "skipped": 0, "running": 0}
        self.finished_here = 0  # pairs ended in this run (for the ETA)
        self._drawn = False

    @property
    def remaining(self) -> int:
        c = self.counts
        return max(0, self.total - c["done"] - c["failed"])

    def eta_s(self) -> Optional[float]:
        if not self.finished_here:
            return None
        return (time.monotonic() - self.t0) / self.finished_here * self.remaining

    def _emit(self, obj: dict) -> None:
        self.stream.write(json.dumps(obj) + "\n")
        self.stream.flush()

    def pair(self, state: str, pair: str, message: str = "", **info) -> None:
        """``state``: ``skipped`` (complete already), ``started``, ``done``, ``retry``, ``failed``."""
        c = self.counts
        if state == "started":
            c["running"] += 1
        elif state in ("done", "failed", "retry"):
            c["running"] = max(0, c["running"] - 1)
            if state != "retry":
                c[state] += 1
                self.finished_here += 1
        elif state == "skipped":
            c["done"] += 1
            c["skipped"] += 1
        eta = self.eta_s()
        if self.mode == "json":
            self._emit(dict({"event": P.EVENT_PROGRESS, "stage": "batch",
                             "fraction": round((c["done"] + c["failed"]) / max(1, self.total), 4),
                             "message": message or f"{pair} {state}", "pair": pair, "state": state,
                             "done": c["done"], "failed": c["failed"], "running": c["running"],
                             "skipped": c["skipped"], "total": self.total,
                             "eta_s": None if eta is None else round(eta, 1),
                             "elapsed_s": round(time.monotonic() - self.t0, 1)}, **info))
        elif self.mode == "bar":
            if self.tty:
                self._draw(f"{pair} {state}")
                if state in ("failed", "retry"):
                    self._line(f"{state}: {pair}: {message}")
            elif state != "skipped":
                self._line(f"{state:>7} {pair}  [{c['done']}/{self.total} done, {c['failed']} failed, "
                           f"ETA {_clock(eta)}]" + (f": {message}" if message and state != "done" else ""))

    def _draw(self, last: str) -> None:
        c, width = self.counts, 30
        n = int(round(width * (c["done"] + c["failed"]) / max(1, self.total)))
        self.stream.write(f"\r[{'#' * n}{'.' * (width - n)}] {c['done']}/{self.total} done, "
                          f"{c['failed']} failed, {c['running']} running, ETA {_clock(self.eta_s())}  "
                          f"{last[:40]:<40}")
        self.stream.flush()
        self._drawn = True

    def _line(self, text: str) -> None:
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def tick(self) -> None:
        if self.tty:
            self._draw("")

    def log(self, message: str, level: str = "info") -> None:
        if self.mode == "json":
            self._emit({"event": P.EVENT_LOG, "level": level, "message": message})
        elif self.mode == "bar":
            self._line(f"{level}: {message}" if level != "info" else message)

    def result(self, out: Path, files: Dict[str, Optional[str]]) -> None:
        c = self.counts
        if self.mode == "json":
            self._emit(dict({"event": P.EVENT_RESULT, "batch": str(out / BATCH_FILE), "done": c["done"],
                             "failed": c["failed"], "skipped": c["skipped"], "total": self.total},
                            **{k: v for k, v in files.items()}))
            return
        if self.mode == "bar":
            self._line(f"{c['done']}/{self.total} pairs done ({c['skipped']} resumed), {c['failed']} failed, "
                       f"in {_clock(time.monotonic() - self.t0)}")
        if files.get("summary"):
            print(files["summary"], flush=True)


def _clock(seconds: Optional[float]) -> str:
    if seconds is None:
        return "--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


# -- the pairs' state -------------------------------------------------------------------------------
class _Tracker:
    """Every pair's status, attempts and error; the retry decision; ``batch.json``."""

    def __init__(self, pairs: Sequence[BatchPair], out: Path, settings: BatchSettings, progress: BatchProgress,
                 skipped: Dict[str, dict]):
        self.pairs = {p.id: p for p in pairs}
        self.order = [p.id for p in pairs]
        self.out, self.settings, self.progress = out, settings, progress
        self.records: Dict[str, dict] = {}
        for p in pairs:
            rec = {"status": "pending", "attempts": 0, "error_kind": None, "error": None,
                   "fingerprint": p.fingerprint, "fixed": p.options.get("fixed"),
                   "moving": p.options.get("moving"), "line": p.line or None}
            if p.id in skipped:
                rec.update(status="done", resumed=True, attempts=skipped[p.id].get("attempt", 1),
                           seconds=skipped[p.id].get("seconds"), worker=skipped[p.id].get("worker"))
            self.records[p.id] = rec
        self.queue: List[str] = [i for i in self.order if i not in skipped]
        self.started = _now()

    def has_work(self) -> bool:
        return bool(self.queue)

    def next(self) -> str:
        return self.queue.pop(0)

    def task(self, pid: str, threads: Optional[int], **extra) -> dict:
        p = self.pairs[pid]
        rec = self.records[pid]
        rec["attempts"] += 1
        rec["status"] = "running"
        return dict({"id": pid, "out_dir": str(self.out), "options": p.options, "fingerprint": p.fingerprint,
                     "attempt": rec["attempts"], "threads": threads, "cells": p.cells}, **extra)

    def started_event(self, pair: str, attempt: Optional[int] = None, **info) -> None:
        """Say that the pair's current attempt started (once; not after it ended)."""
        rec = self.records[pair]
        if rec["status"] != "running" or rec.get("_announced") == rec["attempts"] or \
                (attempt is not None and attempt != rec["attempts"]):
            return
        rec["_announced"] = rec["attempts"]
        self.progress.pair("started", pair, attempt=rec["attempts"], **info)

    def finished(self, pid: str, result: dict) -> bool:
        """Record a pair's attempt; True when it is to be tried again (queued)."""
        self.started_event(pid)  # every attempt that ends was said to start (Dask says it late)
        rec = self.records[pid]
        status = result.get("status")
        worker = {k: result[k] for k in ("pid", "host", "threads", "weight_file_reads") if k in result}
        rec.update(worker=worker or rec.get("worker"), seconds=result.get("seconds"))
        if status == "done":
            rec.update(status="done", error_kind=None, error=None)
            self.progress.pair("done", pid, attempt=rec["attempts"], seconds=round(result.get("seconds") or 0, 2))
            self.save()
            return False
        if status == "cancelled":
            rec.update(status="cancelled", error_kind=P.ERROR_CANCELLED, error=result.get("error"))
            self.save()
            return False
        rec.update(error_kind=result.get("kind") or P.ERROR_INTERNAL, error=result.get("error") or "failed")
        if result.get("traceback"):
            rec["traceback"] = result["traceback"]
        if rec["attempts"] <= self.settings.retries:
            rec["status"] = "pending"
            self.queue.append(pid)
            self.progress.pair("retry", pid, f"attempt {rec['attempts']} failed ({rec['error_kind']}): "
                                              f"{_first_line(rec['error'])}; trying again",
                               attempt=rec["attempts"], kind=rec["error_kind"], error=rec["error"])
            self.save()
            return True
        rec["status"] = "failed"
        self.progress.pair("failed", pid, f"{rec['error_kind']}: {_first_line(rec['error'])}",
                           attempt=rec["attempts"], kind=rec["error_kind"], error=rec["error"])
        self.save()
        return False

    def cancel_pending(self) -> None:
        """After a cancel: a pair that finished meanwhile (its folder renamed into place before
        its worker stopped) is done; the others not done are cancelled."""
        for pid, rec in self.records.items():
            if rec["status"] in ("pending", "running", "cancelled"):
                if pair_complete(self.out / pid, rec["fingerprint"])[0]:
                    rec.update(status="done", error_kind=None, error=None)
                else:
                    rec.update(status="cancelled", error_kind=P.ERROR_CANCELLED, error="the batch was cancelled")

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for rec in self.records.values():
            out[rec["status"]] = out.get(rec["status"], 0) + 1
        return out

    def save(self) -> None:
        s = self.settings
        write_json_atomic(self.out / BATCH_FILE, {
            "format": BATCH_FORMAT, "started": self.started, "updated": _now(),
            "settings": {"jobs": s.jobs, "threads": s.threads, "scheduler": s.scheduler, "retries": s.retries},
            "command": sys.argv, "counts": self.counts(),
            "pairs": {pid: {k: v for k, v in self.records[pid].items() if not k.startswith("_")}
                      for pid in self.order}})

    def summary_records(self) -> List[dict]:
        rows = []
        for pid in self.order:
            rec = self.records[pid]
            p = self.pairs[pid]
            rows.append({"id": pid, "status": rec["status"], "error_kind": rec.get("error_kind"),
                         "error": rec.get("error"), "attempts": rec["attempts"],
                         "resumed": bool(rec.get("resumed")), "fixed": p.options.get("fixed"),
                         "moving": p.options.get("moving"), "seconds": rec.get("seconds"),
                         "folder": str(self.out / pid) if rec["status"] == "done" else None})
        return rows


def _first_line(text: Optional[str]) -> str:
    return (text or "").strip().splitlines()[0][:200] if (text or "").strip() else ""


# -- running on local processes ---------------------------------------------------------------------
def _run_local(tracker: _Tracker, jobs: int, threads: int) -> None:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool
    ctx = _mp_context()

    def start():
        return ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                   initargs=(threads, os.getpid()))
    executor = start()
    running: Dict[object, str] = {}
    try:
        while tracker.has_work() or running:
            while len(running) < jobs and tracker.has_work():
                pid = tracker.next()
                running[executor.submit(run_pair, tracker.task(pid, threads))] = pid
                tracker.started_event(pid)
            done, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
            tracker.progress.tick()
            broken = False
            for fut in done:
                pid = running.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    broken = True
                    result = _crash(pid)
                tracker.finished(pid, result)
            if broken:  # every pair in flight went down with the pool: count the attempt, go on
                for fut, pid in list(running.items()):
                    tracker.finished(pid, _crash(pid))
                running.clear()
                executor.shutdown(wait=False, cancel_futures=True)
                executor = start()
    except BaseException:
        _hold_signals()
        _stop_local(executor)
        raise
    executor.shutdown(wait=True)


def _mp_context():
    """How worker processes start. Never a plain fork of this process (it may hold torch's
    threads): on Linux from a fork server that imported the engine once (a worker starts in
    milliseconds, not the seconds of importing torch), elsewhere spawned afresh."""
    import multiprocessing
    if sys.platform.startswith("linux") and "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["deepreglib.run.batch_worker", "deepreglib.run.pipeline"])
        return ctx
    return multiprocessing.get_context("spawn")


def _hold_signals() -> None:
    """While a cancelled batch cleans up, a second Ctrl-C or SIGTERM must not interrupt it
    (:func:`run_batch` restores the handlers)."""
    if _main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _init_worker(threads: int, parent: int) -> None:
    from .batch_worker import init_local_worker
    init_local_worker(threads, parent)


def _crash(pid: str) -> dict:
    return {"id": pid, "status": "failed", "kind": ERROR_CRASH,
            "error": "the worker process died while registering this pair (killed, or out of memory?)"}


def _stop_local(executor) -> None:
    """Cancel the running pairs (SIGTERM: each run removes its temporary folder), end the
    worker processes (killed if they do not end within :data:`CANCEL_GRACE_S`)."""
    import multiprocessing
    children = list(multiprocessing.active_children())
    for child in children:
        try:
            child.terminate()
        except (OSError, AttributeError):
            pass
    executor.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + CANCEL_GRACE_S
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(5.0)


# -- running on Dask --------------------------------------------------------------------------------
def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise BadInputError("--scheduler needs Dask: install it with  pip install \"dask[distributed]\"  "
                            "(or pip install \"deepreglib[cluster]\"), or leave --scheduler out to run "
                            "on this machine's processes (--jobs N)") from None
    return distributed


def _dask_client(distributed, scheduler: str, progress: BatchProgress):
    """``(client, cluster)``: a LocalCluster of N processes for ``local:N``, else a client of
    the scheduler at the address."""
    if scheduler.startswith("local:") or scheduler == "local":
        try:
            n = int(scheduler.partition(":")[2] or cpu_cores())
            if n < 1:
                raise ValueError
        except ValueError:
            raise BadInputError(f"--scheduler {scheduler!r}: use local:N with N >= 1 worker processes") from None
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        progress.log(f"started a local Dask cluster of {n} worker processes ({cluster.scheduler_address})")
        return distributed.Client(cluster), cluster
    try:
        client = distributed.Client(scheduler, timeout="30s")
    except (OSError, TimeoutError, ValueError) as e:
        raise BadInputError(f"cannot reach the Dask scheduler at {scheduler}: {e}; start one with "
                            "`dask scheduler` and workers with `dask worker tcp://HOST:8786`") from None
    progress.log(f"connected to the Dask scheduler {scheduler} "
                 f"({len(client.scheduler_info().get('workers', {}))} workers)")
    return client, None


def _threads_by_worker(client) -> Dict[str, int]:
    """Torch threads for a pair on each Dask worker: its node's cores over the tasks all the
    node's workers run at once (several ``dask worker`` processes may share a node)."""
    try:
        workers = client.scheduler_info().get("workers", {})
        cores = client.run(cpu_cores)
    except Exception:  # noqa: BLE001 - then each worker decides alone (batch_worker)
        return {}
    per_host: Dict[str, int] = {}
    for info in workers.values():
        per_host[info.get("host")] = per_host.get(info.get("host"), 0) + int(info.get("nthreads") or 1)
    return {addr: max(1, int(cores.get(addr, 1)) // max(1, per_host.get(info.get("host"), 1)))
            for addr, info in workers.items()}


def _run_dask(tracker: _Tracker, scheduler: str, threads: Optional[int]) -> None:
    distributed = _import_distributed()
    client, cluster = _dask_client(distributed, scheduler, tracker.progress)
    by_worker = {} if threads else _threads_by_worker(client)
    token = uuid.uuid4().hex[:12]
    cancel_event = f"deepreg-batch-cancel-{token}"
    topic = f"deepreg-batch-{token}"
    starts: "queue.Queue" = queue.Queue()
    try:
        client.subscribe_topic(topic, starts.put)
    except Exception:  # noqa: BLE001 - "started" events are a nicety
        pass
    futures: Dict[object, str] = {}
    ac = distributed.as_completed()

    def submit(pid):
        task = tracker.task(pid, threads, cancel_event=cancel_event, topic=topic, threads_by_worker=by_worker)
        fut = client.submit(run_pair, task, key=f"deepreg-pair-{pid}-{token}-{task['attempt']}", pure=False)
        futures[fut] = pid
        ac.add(fut)

    def drain_starts():
        while True:
            try:
                event = starts.get_nowait()
            except queue.Empty:
                return
            msg = event[1] if isinstance(event, (tuple, list)) and len(event) == 2 else event
            if isinstance(msg, dict) and msg.get("pair") in tracker.records:
                tracker.started_event(msg["pair"], attempt=msg.get("attempt"), worker_pid=msg.get("pid"),
                                      host=msg.get("host"))

    try:
        while tracker.has_work():
            submit(tracker.next())
        while not ac.is_empty():
            ready = ac.next_batch(block=False)
            if not ready:
                drain_starts()
                tracker.progress.tick()
                time.sleep(0.2)
                continue
            for fut in ready:
                pid = futures.pop(fut)
                try:
                    result = fut.result()
                except Exception as e:  # noqa: BLE001 - KilledWorker (its workers kept dying), lost data
                    kind = ERROR_CRASH if type(e).__name__ == "KilledWorker" else P.ERROR_INTERNAL
                    result = {"id": pid, "status": "failed", "kind": kind, "error": f"{type(e).__name__}: {e}"}
                if tracker.finished(pid, result):
                    submit(tracker.next())
        drain_starts()
    except BaseException:
        _hold_signals()
        _stop_dask(distributed, client, list(futures), cancel_event, tracker.out)
        _close_dask(client, cluster)
        raise
    _close_dask(client, cluster)


def _stop_dask(distributed, client, futures: list, cancel_event: str, out: Path) -> None:
    """Tell the running tasks to cancel (their runs remove their temporary folders), drop the
    queued ones, and wait a little for the running ones to let go of their folders."""
    try:
        distributed.Event(cancel_event, client=client).set()
        client.cancel(futures)
    except Exception:  # noqa: BLE001 - a cluster already gone cancels nothing
        return
    deadline = time.monotonic() + CANCEL_GRACE_S
    while _staging_busy(out) and time.monotonic() < deadline:
        time.sleep(0.2)


def _close_dask(client, cluster) -> None:
    for thing in (client, cluster):
        if thing is not None:
            try:
                thing.close()
            except Exception:  # noqa: BLE001 - closing a half-gone cluster
                pass


# -- the batch --------------------------------------------------------------------------------------
def _check_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / BATCH_FILE).exists() and not (out / LOCK_FILE).exists():
        raise BadInputError(f"--out {out} already holds files that are not a deepreg batch's; choose a new "
                            "folder (a batch never writes over what it did not make)")


def _resume_scan(pairs: Sequence[BatchPair], out: Path) -> Dict[str, dict]:
    """Pairs whose output is complete (their batch_pair.json record); BadInputError for a pair
    folder that is not (changed inputs, or not ours): it is never written over."""
    done: Dict[str, dict] = {}
    conflicts = []
    for p in pairs:
        folder = out / p.id
        if not folder.exists():
            continue
        ok, why = pair_complete(folder, p.fingerprint)
        if ok:
            try:
                done[p.id] = json.loads((folder / PAIR_RECORD).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                done[p.id] = {}
        else:
            conflicts.append(f"{folder}: {why}")
    if conflicts:
        more = f"\n  ... and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
        raise BadInputError(f"{len(conflicts)} pair folder(s) in {out} cannot be resumed and are never written "
                            "over:\n  " + "\n  ".join(conflicts[:10]) + more +
                            "\nRemove those folders to redo the pairs, or choose another --out.")
    return done


def run_batch(pairs: Sequence[BatchPair], settings: BatchSettings,
              progress: Optional[BatchProgress] = None) -> int:
    """Register every pair into ``settings.out`` (module docstring); returns the exit code
    (0 all done, 1 some failed). Raises BadInputError (exit 2) before any work for a folder or
    lock problem; re-raises CancelledError / KeyboardInterrupt (exit 3) once the workers have
    ended and nothing half-written remains."""
    if not pairs:
        raise BadInputError("the batch has no pairs")
    if settings.jobs < 1:
        raise BadInputError(f"--jobs must be >= 1, got {settings.jobs}")
    if settings.retries < 0:
        raise BadInputError(f"--retries must be >= 0, got {settings.retries}")
    if settings.scheduler:
        _import_distributed()  # the clear message before DIR is made
    out = Path(settings.out).expanduser().resolve()
    _check_folder(out)
    progress = progress or BatchProgress(settings.progress, len(pairs))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"cannot create --out {out}: {e}") from None
    with BatchLock(out):
        skipped = _resume_scan(pairs, out)
        left = clean_staging(out)
        if left:
            progress.log(f"temporary folders still held by a live process (an earlier batch's worker?): "
                         f"{', '.join(left)}; those pairs may fail until it ends", "warning")
        tracker = _Tracker(pairs, out, settings, progress, skipped)
        if skipped:
            progress.log(f"resuming: {len(skipped)} of {len(pairs)} pairs already complete, skipped")
            for pid in tracker.order:
                if pid in skipped:
                    progress.pair("skipped", pid)
        tracker.save()
        cancelled = False
        handlers = ({sig: signal.getsignal(sig) for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if sig}
                    if _main_thread() else {})
        try:
            if tracker.has_work():
                if settings.scheduler:
                    _run_dask(tracker, settings.scheduler, settings.threads)
                else:
                    jobs = min(settings.jobs, len(tracker.queue))
                    _run_local(tracker, jobs, threads_per_job(settings.jobs, settings.threads))
        except BaseException:
            cancelled = True
            _hold_signals()
            raise
        finally:
            if cancelled:
                tracker.cancel_pending()
            clean_staging(out)
            tracker.save()
            files = _write_summary(out, tracker, png=settings.summary_png and not cancelled, progress=progress)
            if cancelled:
                for sig, handler in handlers.items():
                    if handler is not None:
                        signal.signal(sig, handler)
        progress.result(out, files)
    counts = tracker.counts()
    return P.EXIT_OK if counts.get("done", 0) == len(pairs) else EXIT_PAIRS_FAILED


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _write_summary(out: Path, tracker: _Tracker, png: bool, progress: BatchProgress) -> Dict[str, Optional[str]]:
    from ..report.batch_summary import draw_summary_png, summary_rows, write_summary_csv
    rows = summary_rows(tracker.summary_records())
    files: Dict[str, Optional[str]] = {"summary": str(write_summary_csv(out / "summary.csv", rows)),
                                       "summary_png": None}
    if png:
        try:
            files["summary_png"] = str(draw_summary_png(out / "summary.png", rows))
        except Exception as e:  # noqa: BLE001 - the picture is a convenience; the CSV has the numbers
            progress.log(f"summary.png was not drawn: {type(e).__name__}: {e}", "warning")
    return files


# -- the command ------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    """The ``deepreg batch`` arguments."""
    p.add_argument("pairs", nargs="?", default=None,
                   help="CSV table, one row per registration: columns fixed, moving and optionally id, "
                        "fixed_labels, moving_labels, *_landmarks, *_mask, preset, method, init, refine, "
                        "method_options ... (any `deepreg register` option); paths relative to the table")
    p.add_argument("--out", required=True, help="batch folder: DIR/<id>/ per pair, summary.csv, summary.png "
                                                "(run the same command again to resume)")
    p.add_argument("--template", default=None, help="register every --moving-glob scan to this fixed image")
    p.add_argument("--moving-glob", default=None, help="with --template: the scans, e.g. 'scans/*.nii.gz'")
    p.add_argument("--template-labels", default=None, help="with --template: its label map (fixed_labels)")
    p.add_argument("--moving-labels", default=None, metavar="PATTERN",
                   help="with --template: each scan's label map, e.g. 'labels/{stem}_seg.nii.gz' "
                        "({stem}: file name without extension, {name}, {dir})")
    p.add_argument("--jobs", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per pair (default: the cores over --jobs, at least 1)")
    p.add_argument("--scheduler", default=None, metavar="local:N|tcp://HOST:PORT",
                   help="run on Dask: a local cluster of N processes, or a running scheduler (needs "
                        "pip install \"dask[distributed]\")")
    p.add_argument("--retries", type=int, default=1, help="tries again after a failure (default 1)")
    p.add_argument("--progress", default="bar", choices=("bar", "json", "none"),
                   help="bar: on stderr; json: one JSON object per line on stdout (pair events, counts, eta_s)")
    p.add_argument("--no-summary-png", action="store_true", help="write summary.csv only")
    g = p.add_argument_group("options of every pair (a table's cells win)")
    g.add_argument("--preset", default=None)
    g.add_argument("--method", default=None)
    g.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N | mps (each worker's)")
    g.add_argument("--init", default=None)
    g.add_argument("--refine", type=int, default=None)
    g.add_argument("--weights", default=None)
    g.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--no-qa", action="store_true", help="no qa.png per pair")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other register option, by its RegisterOptions name (repeatable)")


def batch_from_args(args, method_options: dict) -> int:
    """``deepreg batch``: the pairs from the table or the template, then :func:`run_batch`."""
    from .batch_table import options_from_items, read_pairs_csv, template_pairs
    defaults = options_from_items(args.set)
    for name in ("preset", "method", "device", "init", "refine"):
        if getattr(args, name) is not None:
            defaults[name] = getattr(args, name)
    if args.weights:
        defaults["weights"] = str(Path(args.weights).expanduser().resolve())
    if args.no_qa:
        defaults["qa"] = False
    if method_options:
        defaults["method_options"] = dict(defaults.get("method_options") or {}, **method_options)
    if args.template or args.moving_glob:
        if args.pairs:
            raise BadInputError("give either a pairs table or --template with --moving-glob, not both")
        if not (args.template and args.moving_glob):
            raise BadInputError("--template and --moving-glob go together (every scan of the glob "
                                "registered to the template)")
        pairs = template_pairs(args.template, args.moving_glob, defaults, fixed_labels=args.template_labels,
                               moving_labels=args.moving_labels)
    elif args.pairs:
        if args.template_labels or args.moving_labels:
            raise BadInputError("--template-labels and --moving-labels go with --template; in a table use "
                                "the columns fixed_labels and moving_labels")
        pairs = read_pairs_csv(args.pairs, defaults)
    else:
        raise BadInputError("give a pairs table (deepreg batch PAIRS.csv --out DIR) or --template T "
                            "--moving-glob 'scans/*.nii.gz'")
    settings = BatchSettings(out=args.out, jobs=args.jobs, threads=args.threads, scheduler=args.scheduler,
                             retries=args.retries, progress=args.progress,
                             summary_png=not args.no_summary_png)
    return run_batch(pairs, settings)


__all__ = ["BatchSettings", "BatchProgress", "BatchLock", "run_batch", "add_arguments", "batch_from_args",
           "cpu_cores", "threads_per_job", "clean_staging"]
