"""``deepreg batch`` on small synthetic cohorts, with real registrations (the network method
on 24x28x20 volumes, no initial alignment, no QA picture, 1 thread): local worker processes
and Dask give the same fields as ``deepreg register`` alone; a Dask worker killed mid-batch, a
batch killed with SIGKILL and resumed, a failing pair, bad tables and SIGTERM leave no
half-written pair and no process behind."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepreglib.cli import main
from deepreglib.run.batch_worker import pair_complete

pytestmark = pytest.mark.skipif(os.name == "nt", reason="uses POSIX signals and /proc")

#: what every registration here runs: cheap, deterministic (1 thread), and the same in both paths
RUN = ["--method", "voxelmorph", "--init", "none", "--no-qa", "--threads", "1"]
N_PAIRS = 6


def _volume(shift, shape=(20, 28, 24)) -> sitk.Image:
    """Two blobs (x, y, z = 24, 28, 20 voxels of 2 mm), the pattern moved by ``shift`` voxels."""
    k, j, i = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    c = (np.asarray(shape) - 1) / 2.0 + np.asarray(shift)
    a = np.exp(-(((k - c[0]) / 6) ** 2 + ((j - c[1]) / 8) ** 2 + ((i - c[2]) / 7) ** 2))
    a += 0.6 * np.exp(-(((k - c[0] - 2) / 3) ** 2 + ((j - c[1] + 3) / 3) ** 2 + ((i - c[2] - 2) / 3) ** 2))
    img = sitk.GetImageFromArray(a.astype(np.float32))
    img.SetSpacing((2.0, 2.0, 2.0))
    return img


def _labels(img: sitk.Image) -> sitk.Image:
    return sitk.Cast(sitk.BinaryThreshold(img, 0.3, 10.0, 1, 0), sitk.sitkInt16)


def _write_table(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "fixed", "moving", "fixed_labels", "moving_labels"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """``pairs.csv`` (relative paths; ids given for some rows, derived for the others) and
    ``first4.csv`` in one folder, beside the scans."""
    folder = tmp_path_factory.mktemp("cohort")
    (folder / "scans").mkdir()
    fixed = _volume((0, 0, 0))
    sitk.WriteImage(fixed, str(folder / "scans" / "template.nii.gz"))
    sitk.WriteImage(_labels(fixed), str(folder / "scans" / "template_labels.nrrd"))
    rows = []
    for n in range(N_PAIRS):
        moving = _volume((0.3 * n, 0.5 * n - 1.0, -0.4 * n))
        sitk.WriteImage(moving, str(folder / "scans" / f"sub{n}.nii.gz"))
        sitk.WriteImage(_labels(moving), str(folder / "scans" / f"sub{n}_labels.nrrd"))
        rows.append([f"pair-{n}" if n % 2 else "", "scans/template.nii.gz", f"scans/sub{n}.nii.gz",
                     "scans/template_labels.nrrd", f"scans/sub{n}_labels.nrrd"])
    _write_table(folder / "pairs.csv", rows)
    _write_table(folder / "first4.csv", rows[:4])
    return folder


def _ids():
    return [f"pair-{n}" if n % 2 else f"sub{n}_to_template" for n in range(N_PAIRS)]


def _field(folder: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "displacement.mha")))


@pytest.fixture(scope="module")
def alone(cohort, tmp_path_factory):
    """Each pair registered by ``deepreg register`` on its own: id -> displacement field."""
    out = tmp_path_factory.mktemp("alone")
    threads = torch.get_num_threads()
    fields = {}
    try:
        for n, pid in enumerate(_ids()):
            s = cohort / "scans"
            rc = main(["register", "--fixed", str(s / "template.nii.gz"), "--moving", str(s / f"sub{n}.nii.gz"),
                       "--fixed-labels", str(s / "template_labels.nrrd"),
                       "--moving-labels", str(s / f"sub{n}_labels.nrrd"), "--out", str(out / pid),
                       "--progress", "none", *RUN])
            assert rc == 0
            fields[pid] = _field(out / pid)
    finally:
        torch.set_num_threads(threads)
    return fields


def _assert_all_complete(out: Path, ids, alone=None):
    batch = json.loads((out / "batch.json").read_text())
    for pid in ids:
        ok, why = pair_complete(out / pid, batch["pairs"][pid]["fingerprint"])
        assert ok, f"{pid}: {why}"
        assert batch["pairs"][pid]["status"] == "done"
        if alone is not None:
            assert np.allclose(_field(out / pid), alone[pid], atol=1e-5), pid
    assert not (out / ".staging").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".batch.lock"]
    return batch


def _summary(out: Path):
    with open(out / "summary.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_weights_are_read_once_per_process_while_unchanged(tmp_path):
    from deepreglib.io.models import WEIGHT_FILE_READS, models_dir
    from deepreglib.methods.weights import load_model
    for ext in (".pt", ".json"):  # copy2 keeps the shipped files' (old) times
        shutil.copy2(models_dir() / f"voxelmorph{ext}", tmp_path / f"vm{ext}")
    path = tmp_path / "vm.pt"
    key = str(path.resolve())
    a, _ = load_model(path)
    b, _ = load_model(path)
    assert WEIGHT_FILE_READS[key] == 1
    assert a is not b and all(x.data_ptr() != y.data_ptr() for x, y in zip(a.parameters(), b.parameters()))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # changed: read again, then cached
    load_model(path)
    load_model(path)
    assert WEIGHT_FILE_READS[key] == 2
    path.write_bytes(path.read_bytes())  # just written: its time stamp is not trusted yet
    load_model(path)
    load_model(path)
    assert WEIGHT_FILE_READS[key] == 4


def test_batch_on_two_local_processes_equals_register_alone(cohort, alone, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the table's relative paths start at its own folder, not here
    out = tmp_path / "cohort_out"
    assert main(["batch", str(cohort / "pairs.csv"), "--out", str(out), "--jobs", "2", "--progress", "none",
                 *RUN]) == 0
    batch = _assert_all_complete(out, _ids(), alone)
    # each worker process read the network's weights once, however many pairs it ran
    reads_by_pid = {}
    for rec in batch["pairs"].values():
        reads_by_pid.setdefault(rec["worker"]["pid"], []).append(rec["worker"]["weight_file_reads"])
    assert 1 <= len(reads_by_pid) <= 2 and max(len(v) for v in reads_by_pid.values()) >= 3
    assert all(v == [1] * len(v) for v in reads_by_pid.values()), reads_by_pid
    rows = _summary(out)
    assert list(rows) == _ids()
    for r in rows.values():
        assert r["status"] == "done" and r["attempts"] == "1" and r["method"] == "voxelmorph"
        assert float(r["dice_after"]) > 0.5 and float(r["total_s"]) > 0 and r["time_inference_s"]
        assert float(r["peak_ram_mb"]) > 0 and r["folding_percent"] != ""
    assert (out / "summary.png").stat().st_size > 10_000


def test_batch_on_a_local_dask_cluster_equals_register_alone(cohort, alone, tmp_path):
    pytest.importorskip("distributed")
    out = tmp_path / "dask_out"
    assert main(["batch", str(cohort / "pairs.csv"), "--out", str(out), "--scheduler", "local:2",
                 "--progress", "none", "--no-summary-png", *RUN]) == 0
    _assert_all_complete(out, _ids(), alone)
    assert all(r["status"] == "done" for r in _summary(out).values())


def _batch_command(table: Path, out: Path, *extra):
    return [sys.executable, "-m", "deepreglib", "batch", str(table), "--out", str(out), "--progress", "json",
            "--no-summary-png", *RUN, *extra]


class _Events:
    """The JSON events of a batch subprocess's stdout, read by a thread (so that a stalled batch
    fails the test instead of hanging it)."""

    def __init__(self, proc):
        import queue
        import threading
        self.proc, self.seen, self.lines = proc, [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in iter(self.proc.stdout.readline, ""):
            self.lines.put(line)
        self.lines.put(None)

    def until(self, predicate, timeout=120.0):
        """Events until ``predicate(event, seen)`` holds (None: until stdout closes)."""
        import queue
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                if predicate is None:
                    return self.seen
                break
            if line.startswith("{"):
                self.seen.append(json.loads(line))
                if predicate is not None and predicate(self.seen[-1], self.seen):
                    return self.seen
        raise AssertionError(f"the batch ended or stalled first; events: {self.seen[-5:]}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _descendants(pid: int):
    """Every process below ``pid`` (workers may be children of a fork server, not of the batch)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    found, frontier = [], [pid]
    while frontier:
        below = [c for c, p in parents.items() if p in frontier]
        found += below
        frontier = below
    return found


def _is_pair_event(state):
    return lambda e, seen: e.get("event") == "progress" and e.get("state") == state


def test_a_dask_worker_killed_mid_batch_does_not_lose_a_pair(cohort, tmp_path):
    distributed = pytest.importorskip("distributed")
    out = tmp_path / "out"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        workers = client.run(os.getpid)
        with open(tmp_path / "stderr.txt", "w") as err:
            proc = subprocess.Popen(_batch_command(cohort / "first4.csv", out, "--scheduler", cluster.scheduler_address),
                                    stdout=subprocess.PIPE, stderr=err, text=True)
            try:
                seen = _Events(proc).until(_is_pair_event("done"))
                ended = {e["pair"] for e in seen if e.get("state") == "done"}
                busy = [e["worker_pid"] for e in seen if e.get("state") == "started" and e["pair"] not in ended]
                victim = busy[0] if busy else sorted(workers.values())[0]
                os.kill(victim, signal.SIGKILL)
                proc.wait(timeout=180)
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
        assert not _alive(victim)
    _assert_all_complete(out, _ids()[:4])
    assert all(r["status"] == "done" for r in _summary(out).values())


def test_a_killed_batch_resumes_without_redoing_finished_pairs(cohort, tmp_path):
    out = tmp_path / "out"
    command = _batch_command(cohort / "first4.csv", out)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        seen = _Events(proc).until(lambda e, s: sum(x.get("state") == "done" for x in s) >= 2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the batch and its worker, mid-pair
        proc.wait(30)
    finished = [e["pair"] for e in seen if e.get("state") == "done"]
    stamps = {pid: (out / pid / "manifest.json").stat().st_mtime_ns for pid in finished}
    again = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    events = [json.loads(line) for line in again.stdout.splitlines() if line.startswith("{")]
    skipped = [e["pair"] for e in events if e.get("state") == "skipped"]
    assert sorted(skipped) == sorted(finished)
    assert not [e for e in events if e.get("state") == "started" and e["pair"] in finished]
    assert any(f"{len(finished)} of 4 pairs already complete" in e.get("message", "") for e in events)
    assert {pid: (out / pid / "manifest.json").stat().st_mtime_ns for pid in finished} == stamps
    _assert_all_complete(out, _ids()[:4])
    rows = _summary(out)
    assert all(r["status"] == "done" for r in rows.values())
    assert sorted(pid for pid, r in rows.items() if r["resumed"] == "yes") == sorted(finished)


def test_a_failing_pair_is_retried_once_recorded_and_the_others_complete(cohort, tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really a gzip'd NIfTI" * 10)
    scans = cohort / "scans"
    table = _write_table(tmp_path / "pairs.csv", [
        ["good", str(scans / "template.nii.gz"), str(scans / "sub1.nii.gz"), "", ""],
        ["broken", str(scans / "template.nii.gz"), "broken.nii.gz", "", ""]])
    out = tmp_path / "out"
    assert main(["batch", str(table), "--out", str(out), "--progress", "none", "--no-summary-png", *RUN]) == 1
    rows = _summary(out)
    assert rows["good"]["status"] == "done" and rows["good"]["attempts"] == "1"
    bad = rows["broken"]
    assert bad["status"] == "failed" and bad["attempts"] == "2"
    assert bad["error_kind"] in ("bad_input", "internal") and "broken.nii.gz" in bad["error"]
    assert not (out / "broken").exists() and not (out / ".staging").exists()
    assert pair_complete(out / "good", json.loads((out / "batch.json").read_text())["pairs"]["good"]["fingerprint"])[0]


def test_bad_tables_exit_2_naming_the_problem_and_write_nothing(cohort, tmp_path, capsys):
    scans = cohort / "scans"
    cases = {
        "unknown.csv": (f"fixed,moving,fixd_labels\n{scans}/template.nii.gz,{scans}/sub0.nii.gz,x\n",
                        ["unknown column 'fixd_labels'", "valid columns", "fixed_labels", "moving_labels"]),
        "missing.csv": (f"fixed,fixed_labels\n{scans}/template.nii.gz,x\n", ["missing column 'moving'"]),
        "nofile.csv": (f"fixed,moving\n{scans}/template.nii.gz,scans/nowhere.nii.gz\n",
                       ["row 2", "moving file 'scans/nowhere.nii.gz' does not exist"]),
        "badcell.csv": (f"fixed,moving,refine\n{scans}/template.nii.gz,{scans}/sub0.nii.gz,lots\n",
                        ["row 2, column 'refine'", "whole number"]),
        "contrast.csv": (f"fixed,moving,contrast\n{scans}/template.nii.gz,{scans}/sub0.nii.gz,diferent\n",
                         ["row 2", "contrast must be one of same, different", "'diferent'"]),
    }
    for name, (text, phrases) in cases.items():
        (tmp_path / name).write_text(text)
        out = tmp_path / f"out_{name}"
        assert main(["batch", str(tmp_path / name), "--out", str(out), *RUN]) == 2  # errors on stderr
        err = capsys.readouterr().err
        for phrase in phrases:
            assert phrase in err, (name, err)
        assert not out.exists()
    # a batch already running on the folder: the second refuses
    from deepreglib.run.batch import BatchLock
    out = tmp_path / "busy"
    out.mkdir()
    with BatchLock(out):
        assert main(["batch", str(cohort / "pairs.csv"), "--out", str(out), *RUN]) == 2
    assert f"another deepreg batch is running on {out} (pid {os.getpid()}" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".batch.lock"]


def test_a_contrast_column_sets_each_pairs_similarity(cohort, tmp_path):
    """``contrast`` per pair, as ``--contrast`` on the command line: ``different`` runs the balanced
    preset's optimiser on MIND-SSC and aligns by mutual information; an empty cell keeps the
    batch's own value (``--set contrast=...``, else ``same``)."""
    from deepreglib.run.batch_table import read_pairs_csv
    from deepreglib.run.options import apply_preset
    scans = cohort / "scans"
    table = tmp_path / "pairs.csv"
    table.write_text(f"id,fixed,moving,contrast\nmr_us,{scans}/template.nii.gz,{scans}/sub0.nii.gz,different\n"
                     f"t1_t1,{scans}/template.nii.gz,{scans}/sub1.nii.gz,\n")
    for defaults, plain in (({}, "same"), ({"contrast": "different"}, "different")):
        pairs = {p.id: apply_preset(p.register_options(out=str(tmp_path / p.id)))
                 for p in read_pairs_csv(table, defaults)}
        assert pairs["mr_us"].contrast == "different" and pairs["mr_us"].method_options["similarity"] == "mind"
        assert pairs["t1_t1"].contrast == plain
        assert pairs["t1_t1"].method_options.get("similarity", "lncc") == ("mind" if plain == "different" else "lncc")


def test_sigterm_cancels_cleanly_no_half_pair_no_orphan(cohort, tmp_path):
    out = tmp_path / "out"
    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen(_batch_command(cohort / "pairs.csv", out, "--jobs", "2"), stdout=subprocess.PIPE,
                            stderr=err, text=True)
    try:
        events = _Events(proc)
        events.until(_is_pair_event("done"))
        workers = _descendants(proc.pid)
        assert len(workers) >= 2  # the two workers (and their fork server)
        proc.send_signal(signal.SIGTERM)
        seen = events.until(None, timeout=60)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
    assert proc.returncode == 3, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert seen[-1]["event"] == "error" and seen[-1]["kind"] == "cancelled"
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)]
    batch = json.loads((out / "batch.json").read_text())
    states = {pid: rec["status"] for pid, rec in batch["pairs"].items()}
    assert "cancelled" in states.values() and set(states.values()) <= {"done", "cancelled"}
    for pid, state in states.items():  # a pair is complete, or not there at all
        assert pair_complete(out / pid, batch["pairs"][pid]["fingerprint"])[0] if state == "done" \
            else not (out / pid).exists()
    assert not (out / ".staging").exists()
    assert (out / "summary.csv").is_file()


def test_a_killed_coordinators_temporary_files_are_removed_on_resume(tmp_path):
    """A SIGKILL in the middle of the coordinator's atomic write of batch.json leaves
    ``.batch.json.tmp-PID-TID`` (seen in the kill test, at random); the next batch in that folder
    removes it, and keeps the user's own files and finished pairs."""
    from deepreglib.run.batch import clean_staging
    out = tmp_path / "batch"
    (out / ".staging" / "pairA.partial").mkdir(parents=True)
    (out / "done_pair").mkdir()
    (out / "done_pair" / "manifest.json").write_text("{}")
    (out / ".batch.json.tmp-1234-5678").write_text('{"half": ')
    (out / "notes.txt").write_text("mine")
    assert clean_staging(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["done_pair", "notes.txt"]
    assert (out / "done_pair" / "manifest.json").read_text() == "{}"
