"""``deepreg train`` under ``torchrun --nproc_per_node 2`` (gloo on the CPU): the processes draw
different batches, average their gradients and end with identical weights (issue 17)."""
import json
import os
import shutil
import subprocess
import sys

import pytest


@pytest.mark.parametrize("from_shipped", [False, True])
def test_two_cpu_processes_keep_identical_weights(tmp_path, from_shipped):
    pytest.importorskip("torch.distributed")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "deepreglib", "train", "voxelmorph", "--out", str(out),
           "--steps", "3", "--shape", "16", "16", "16", "--threads", "1", "--synth-bank", "4"]
    if from_shipped:  # only rank 0 starts the run folder; the others take its weights
        from deepreglib.methods.weights import shipped_weights
        cmd[cmd.index("--steps") + 1] = str(_shipped_steps() + 3)
        cmd += ["--init-from", str(shipped_weights("voxelmorph"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((out / "distributed.json").read_text())
    assert record["world_size"] == 2
    assert record["max_abs_difference_from_rank0"] == [0.0, 0.0]
    assert record["weight_sums"][0] == record["weight_sums"][1]
    rows = (out / "loss.csv").read_text().strip().splitlines()
    assert len(rows) == 4  # header + 3 steps, written once (rank 0)
    assert "on 2 processes" in proc.stdout


def _shipped_steps() -> int:
    from deepreglib.methods.weights import shipped_weights
    return int(json.loads(shipped_weights("voxelmorph").with_suffix(".json").read_text())["iterations"])
