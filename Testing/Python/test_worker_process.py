"""DeepRegistrationLib.process.WorkerProcess with real subprocesses (outside Slicer): start,
progress parsing, cancel ending the whole process tree, crash and bad-input reporting."""
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepRegExtension"))

from DeepRegistrationLib.process import WorkerProcess, register_command  # noqa: E402

pytestmark = pytest.mark.skipif(os.name == "nt", reason="uses POSIX signals and /proc")


def _script(tmp_path, body: str) -> list:
    path = tmp_path / "fake_worker.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _drain_until(worker, predicate, timeout=60.0):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += worker.poll()
        if any(predicate(e) for e in seen):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"no matching event within {timeout} s; saw {seen[-5:]}")


def test_progress_events_parsed_and_result_resolved(tmp_path):
    (tmp_path / "run").mkdir()
    args = _script(tmp_path, """
        import json, sys
        def emit(**e): print(json.dumps(e), flush=True)
        emit(event="progress", stage="read", fraction=0.05, message="reading")
        print("a plain line from some library", flush=True)
        sys.stderr.write("UserWarning: something noisy\\n"); sys.stderr.flush()
        emit(event="progress", stage="inference", fraction=0.6, message="halfway")
        emit(event="log", level="warning", message="only 40% overlap")
        emit(event="progress", stage="done", fraction=1.0, message="done")
        emit(event="result", manifest="out/manifest.json")
    """)
    w = WorkerProcess(args, cwd=str(tmp_path / "run")).start()
    assert w.wait(timeout=30) == 0
    events = w.poll()
    kinds = [e["event"] for e in events]
    assert kinds.count("progress") == 3 and kinds.count("result") == 1
    assert {"event": "log", "level": "info", "message": "a plain line from some library"} in events
    assert any(e.get("level") == "stderr" and "noisy" in e["message"] for e in events)
    assert w.fraction == 1.0 and w.stage == "done"
    out = w.outcome()
    assert out.ok and out.status == "done"
    assert out.manifest == str(tmp_path / "run" / "out" / "manifest.json")


def test_poll_never_blocks_while_worker_is_silent(tmp_path):
    w = WorkerProcess(_script(tmp_path, "import time; time.sleep(30)")).start()
    try:
        t0 = time.monotonic()
        assert w.poll() == []
        assert time.monotonic() - t0 < 0.5
        assert w.running and not w.finished
    finally:
        w.cancel(grace_seconds=0.5)
    assert not w.running


def test_cancel_kills_the_whole_tree_even_if_sigterm_is_ignored(tmp_path):
    args = _script(tmp_path, """
        import json, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker stuck in native code
        child = subprocess.Popen([sys.executable, "-c",
                                  "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        print(json.dumps({"event": "log", "level": "info", "message": str(child.pid)}), flush=True)
        time.sleep(60)
    """)
    w = WorkerProcess(args, grace_seconds=0.5).start()
    events = _drain_until(w, lambda e: e.get("message", "").isdigit(), timeout=20)
    child_pid = int(next(e["message"] for e in events if e.get("message", "").isdigit()))
    worker_pid = w.pid
    assert _alive(worker_pid) and _alive(child_pid)
    t0 = time.monotonic()
    w.cancel()
    assert time.monotonic() - t0 < 10
    assert _wait_for(lambda: not _alive(worker_pid) and not _alive(child_pid), timeout=10)
    w.wait(timeout=10)
    out = w.outcome()
    assert out.status == "cancelled"
    assert w.returncode == -signal.SIGKILL


def test_crash_reports_last_error_line_not_a_bare_traceback(tmp_path):
    args = _script(tmp_path, """
        import json
        print(json.dumps({"event": "progress", "stage": "read", "fraction": 0.05}), flush=True)
        def f(): return 1 / 0
        f()
    """)
    w = WorkerProcess(args).start()
    assert w.wait(timeout=30) == 1
    out = w.outcome()
    assert out.status == "failed"
    assert out.message.startswith("The registration worker stopped with exit code 1.")
    assert "ZeroDivisionError: division by zero" in out.message
    assert "Traceback (most recent call last)" in out.details  # kept for the details pane
    assert not out.message.startswith("Traceback")


def test_killed_by_signal_is_named(tmp_path):
    w = WorkerProcess(_script(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")).start()
    assert w.wait(timeout=30) == -signal.SIGSEGV
    out = w.outcome()
    assert out.status == "failed" and "killed by signal SIGSEGV" in out.message


def test_error_event_message_is_used(tmp_path):
    args = _script(tmp_path, """
        import json, sys
        print(json.dumps({"event": "error", "kind": "internal", "message": "RuntimeError: CUDA error"}), flush=True)
        sys.exit(1)
    """)
    w = WorkerProcess(args).start()
    w.wait(timeout=30)
    out = w.outcome()
    assert out.status == "failed" and out.message == "The registration failed: RuntimeError: CUDA error"


def test_real_worker_bad_input(tmp_path):
    cmd = register_command(str(tmp_path / "missing_fixed.nrrd"), str(tmp_path / "missing_moving.nrrd"),
                           str(tmp_path / "out"), "iterative", python=sys.executable, device="cpu")
    w = WorkerProcess(cmd).start()
    assert w.wait(timeout=120) == 2
    out = w.outcome()
    assert out.status == "bad_input"
    assert "not found" in out.message and "missing_fixed.nrrd" in out.message
    assert not (tmp_path / "out").exists()


def _pair(tmp_path, n=40):
    z, y, x = np.mgrid[:n, :n, :n].astype(np.float32)
    paths = []
    for name, c in (("fixed", n / 2), ("moving", n / 2 + 2)):
        arr = 100 * np.exp(-((x - c) ** 2 + (y - n / 2) ** 2 + (z - n / 2) ** 2) / (2 * 6.0 ** 2))
        path = tmp_path / f"{name}.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.float32)), str(path))
        paths.append(str(path))
    return paths


def test_real_worker_cancel_is_clean(tmp_path):
    fixed, moving = _pair(tmp_path)
    out_dir = tmp_path / "out"
    cmd = register_command(fixed, moving, str(out_dir), "iterative", python=sys.executable, device="cpu")
    w = WorkerProcess(cmd, grace_seconds=20).start()
    _drain_until(w, lambda e: e.get("stage") == "inference", timeout=120)
    w.cancel()
    assert w.returncode == 3  # the worker stopped itself on SIGTERM (no SIGKILL needed)
    w.wait(timeout=10)
    out = w.outcome()
    assert out.status == "cancelled" and out.manifest is None
    assert not out_dir.exists()
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())


def test_register_command_arguments():
    cmd = register_command("f.nrrd", "m.nrrd", "out", "voxelmorph", python="py", device="cuda:1",
                           refine=5, options={"fixed-mask": "fm.nrrd", "moving-mask": None},
                           flags=("no-qa",))
    assert cmd[:4] == ["py", "-m", "deepreglib", "register"]
    joined = " ".join(cmd)
    for part in ("--fixed f.nrrd", "--moving m.nrrd", "--out out", "--method voxelmorph",
                 "--device cuda:1", "--refine 5", "--progress json", "--fixed-mask fm.nrrd", "--no-qa"):
        assert part in joined
    assert "--moving-mask" not in cmd
    with pytest.raises(ValueError):
        register_command("f", "m", "o", "iterative", refine=-1)
    # the command line matches the worker's parser
    from deepreglib.cli import build_parser
    args = build_parser().parse_args(cmd[3:])
    assert args.method == "voxelmorph" and args.refine == 5 and args.fixed_mask == "fm.nrrd" and args.no_qa


def test_method_options_reach_the_worker_parser():
    from DeepRegistrationLib.process import parse_method_options
    opts = parse_method_options("uncertainty_samples=16;  steps=affine,coarse\nquery_point = [1.5, -2, 3]")
    assert opts == {"uncertainty_samples": "16", "steps": "affine,coarse", "query_point": "[1.5, -2, 3]"}
    assert parse_method_options("") == {} and parse_method_options(" ; ") == {}
    for bad in ("no_equals_sign", "=3"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_method_options(bad)
    opts["seed"] = 7
    opts["query_point"] = [1.5, -2.0, 3.0]  # a value that is not a string goes as JSON
    cmd = register_command("f.nrrd", "m.nrrd", "out", "carnet", python="py", method_options=opts)
    from deepreglib.cli import build_parser, parse_method_options as engine_parse
    args = build_parser().parse_args(cmd[3:])
    assert engine_parse(args.method_option) == {"uncertainty_samples": 16, "steps": "affine,coarse",
                                                "query_point": [1.5, -2.0, 3.0], "seed": 7}


def test_real_worker_reports_an_option_the_method_does_not_have(tmp_path):
    fixed, moving = _pair(tmp_path, n=16)
    cmd = register_command(fixed, moving, str(tmp_path / "out"), "iterative", python=sys.executable,
                           device="cpu", method_options={"query_point": [0.0, 0.0, 0.0]})
    w = WorkerProcess(cmd).start()
    assert w.wait(timeout=120) == 2
    out = w.outcome()
    assert out.status == "bad_input"
    assert "query_point" in out.message and "options are" in out.message
    assert "Traceback" not in out.message


def test_initial_alignment_list_offers_the_learned_initializers_the_worker_has(tmp_path):
    from DeepRegistrationLib.process import CLASSIC_INITIALIZATIONS, initialization_choices
    from deepreglib.methods.weights import models_dir
    from deepreglib.run.initializers import init_choices
    assert initialization_choices(str(tmp_path)) == list(CLASSIC_INITIALIZATIONS)
    assert initialization_choices(None) == list(CLASSIC_INITIALIZATIONS)
    (tmp_path / "dnet.pt").write_bytes(b"")
    values = [v for _, v in initialization_choices(str(tmp_path))]
    assert values[-2:] == ["dnet", "dnet+rigid"] and "same-affine" not in values
    (tmp_path / "same.pt").write_bytes(b"")
    assert [v for _, v in initialization_choices(str(tmp_path))][-2:] == ["same-affine", "same-affine+affine"]
    # with the shipped weights, every value listed is one the worker's --init accepts
    shipped = [v for _, v in initialization_choices(str(models_dir()))]
    assert {"dnet", "dnet+rigid", "same-affine", "same-affine+affine"} <= set(shipped)
    assert set(shipped) <= set(init_choices())
