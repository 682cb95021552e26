"""OpenMP's wait policy, chosen from how busy the CPU is, before torch is imported.

torch's CPU kernels run thousands of small OpenMP parallel regions per registration. Between
regions, idle OpenMP threads either spin for a while (the runtime's default) or sleep at once
(``OMP_WAIT_POLICY=PASSIVE``). Measured on 2 cores (docs/BENCHMARKS.md, 2026-12-06):

- quiet machine: a balanced run takes 7.4 s with spinning threads and 10.2 s with PASSIVE;
- another busy process on the machine: 25.6 s with spinning threads, 10.5 s with PASSIVE
  (the spinning threads take the cores that the other worker thread needs).

So the engine spins only when there are enough idle cores for all of its threads, and sleeps
otherwise. Work at a lower priority (a ``nice -n 19`` training job) does not take a core from it
and is not counted. A value the user set in the environment always wins. This module never imports torch:
the runtime reads the variable once, when torch loads it.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

#: the environment variables that decide the wait policy, OpenMP's and Intel OpenMP's (Windows)
_USER_VARS = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")
#: set beside ``OMP_WAIT_POLICY`` when this module chose it: a child process (a batch worker)
#: inherits the environment, and must not take its parent's choice for the user's
_CHOSEN_HERE = "DEEPREG_WAIT_POLICY_CHOSEN"


def runnable_threads() -> Optional[List[Tuple[int, int]]]:
    """``(pid, nice)`` of every thread of another process that is running or ready to run now
    (Linux: state ``R`` in ``/proc/*/task/*/stat``; ~2 ms for ~100 threads); ``None`` where there
    is no ``/proc``."""
    if not os.path.isdir("/proc/self/task"):
        return None
    me = str(os.getpid())
    out: List[Tuple[int, int]] = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    stat = f.read()
                fields = stat[stat.rindex(b")") + 2:].split()  # the name may hold spaces
                if fields[0] == b"R":
                    out.append((int(pid), int(fields[16])))
            except (OSError, ValueError, IndexError):
                continue
    return out


def runnable_others() -> Optional[float]:
    """How many other threads want a CPU now and are not nicer than this process: a nicer task
    yields its core to ours (CFS weight 15 at nice 19 against 1024 at nice 0), so a background job
    at ``nice -n 19`` does not count. On Linux from :func:`runnable_threads`; else the 1-minute
    load average where the OS has one (macOS; it counts nice jobs too); else ``None`` (Windows:
    unknown)."""
    threads = runnable_threads()
    if threads is not None:
        try:
            mine = os.getpriority(os.PRIO_PROCESS, 0)
        except (AttributeError, OSError):
            mine = 0
        return float(sum(1 for _, nice in threads if nice <= mine))
    getloadavg = getattr(os, "getloadavg", None)
    if getloadavg is not None:
        try:
            return float(getloadavg()[0])
        except OSError:
            return None
    return None


def choose_wait_policy(threads: Optional[int], cores: Optional[int] = None,
                       others: Optional[Callable[[], Optional[float]]] = None) -> str:
    """``"default"`` when ``threads`` (``None``: all cores) fit beside the other runnable work on
    ``cores``, else ``"PASSIVE"``; ``"PASSIVE"`` as well when the load cannot be read."""
    cores = cores or os.cpu_count() or 1
    want = cores if not threads else min(int(threads), cores)
    busy = (others or runnable_others)()
    if busy is None:
        return "PASSIVE"
    return "default" if busy + want <= cores + 0.5 else "PASSIVE"


def apply_wait_policy(threads: Optional[int]) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in this process's environment when the CPU is busy (see the
    module's doc), unless the user chose a policy; returns what is in force. A policy that this
    module set in a parent process (a batch coordinator) is chosen again for this process."""
    if os.environ.pop(_CHOSEN_HERE, None) is not None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    for name in _USER_VARS:
        if name in os.environ:
            return f"{name}={os.environ[name]} (set by the user)"
    policy = choose_wait_policy(threads)
    if policy == "PASSIVE":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ[_CHOSEN_HERE] = "1"
    return policy
