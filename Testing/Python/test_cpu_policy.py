"""OpenMP's wait policy (run/cpu_policy.py): threads spin only when the cores are free, a user's
choice always wins, and the CLI sets the policy before torch is imported."""
import json
import os
import subprocess
import sys

from deepreglib.run import cpu_policy
from deepreglib.run.cpu_policy import choose_wait_policy


def test_spins_only_when_the_threads_fit_beside_the_other_work():
    assert choose_wait_policy(2, cores=2, others=lambda: 0.0) == "default"
    assert choose_wait_policy(None, cores=2, others=lambda: 0.0) == "default"  # all cores, all free
    assert choose_wait_policy(2, cores=2, others=lambda: 1.0) == "PASSIVE"  # one core taken
    assert choose_wait_policy(1, cores=2, others=lambda: 1.0) == "default"  # one thread fits
    assert choose_wait_policy(None, cores=16, others=lambda: 3.0) == "PASSIVE"
    assert choose_wait_policy(8, cores=16, others=lambda: 3.0) == "default"
    assert choose_wait_policy(64, cores=2, others=lambda: 0.0) == "default"  # capped at the cores


def test_unknown_load_sleeps():
    """Where the load cannot be read (Windows), sleeping is the safe choice: spinning beside a busy
    process cost 2.4x (module doc)."""
    assert choose_wait_policy(2, cores=2, others=lambda: None) == "PASSIVE"


def test_the_load_reader_counts_others(monkeypatch):
    value = cpu_policy.runnable_others()
    assert value is None or value >= 0.0
    if os.path.exists("/proc/loadavg"):
        assert value is not None


def test_a_user_choice_wins(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr(cpu_policy, "runnable_others", lambda: 5.0)
    assert "set by the user" in cpu_policy.apply_wait_policy(2)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("KMP_BLOCKTIME", "0")
    assert "KMP_BLOCKTIME" in cpu_policy.apply_wait_policy(2)
    assert "OMP_WAIT_POLICY" not in os.environ


def test_busy_sets_passive(monkeypatch):
    for name in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_policy, "runnable_others", lambda: 8.0)
    assert cpu_policy.apply_wait_policy(None) == "PASSIVE"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(cpu_policy, "runnable_others", lambda: 0.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 1024)
    assert cpu_policy.apply_wait_policy(None) == "default"
    assert "OMP_WAIT_POLICY" not in os.environ


def test_a_policy_inherited_from_the_engine_is_chosen_again(monkeypatch):
    """A batch worker inherits the coordinator's environment: the PASSIVE the coordinator chose
    is not the user's, so the worker chooses for itself (and says so truthfully)."""
    for name in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT", "DEEPREG_WAIT_POLICY_CHOSEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_policy, "runnable_others", lambda: 8.0)
    assert cpu_policy.apply_wait_policy(None) == "PASSIVE"  # the coordinator, on a busy machine
    monkeypatch.setattr(cpu_policy, "runnable_others", lambda: 0.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 1024)
    assert cpu_policy.apply_wait_policy(2) == "default"      # its worker, once the cores are free
    assert "OMP_WAIT_POLICY" not in os.environ and "DEEPREG_WAIT_POLICY_CHOSEN" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")         # the user's own choice still wins
    assert "set by the user" in cpu_policy.apply_wait_policy(2)


def test_the_cli_decides_before_torch_loads(tmp_path):
    """``main`` chooses the policy before anything imports torch (the runtime reads it once)."""
    code = ("import sys, os\n"
            "from deepreglib.run import cpu_policy\n"
            "seen = []\n"
            "real = cpu_policy.apply_wait_policy\n"
            "def spy(threads):\n"
            "    seen.append(('torch' in sys.modules, threads))\n"
            "    return real(threads)\n"
            "cpu_policy.apply_wait_policy = spy\n"
            "from deepreglib import cli\n"
            "assert 'torch' not in sys.modules\n"
            "cli.main(['register', '--threads=3', '--help'])\n"
            "import json; print(json.dumps(seen))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[False, 3]]


def test_a_busy_process_is_seen_and_a_nice_one_is_not_counted():
    """A busy child at our priority is counted; the same child at nice 19 is seen but not counted
    (it yields its core: spinning beside it costs nothing)."""
    import time
    import pytest
    if cpu_policy.runnable_threads() is None:
        pytest.skip("no /proc here: the load average is used instead")
    # the nice child is seen at nice 0 while its interpreter starts, so the last value seen counts
    busy = "import time\nt = time.time()\nwhile time.time() - t < 20: pass\n"
    children = [subprocess.Popen([sys.executable, "-c", busy]),
                subprocess.Popen([sys.executable, "-c", "import os\nos.nice(19)\n" + busy])]
    try:
        seen = {}
        deadline = time.time() + 10
        while time.time() < deadline and not (len(seen) == 2 and seen[children[1].pid] == 19):
            for pid, nice in cpu_policy.runnable_threads():
                if pid in (children[0].pid, children[1].pid):
                    seen[pid] = nice
            time.sleep(0.05)
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        assert seen.get(children[0].pid) == mine
        assert seen.get(children[1].pid) == 19
    finally:
        for c in children:
            c.kill()
            c.wait()
