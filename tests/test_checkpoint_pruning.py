"""Tests of rate_tuning.checkpoint's pruning and staging ownership: only verified checkpoints of this
history count toward ``keep`` and may be deleted, anything else is set aside or left alone; a save removes
no other live process's staging; SIGKILL at the crash-test seams ``seal`` and ``prune`` (in subprocesses)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rate_tuning import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"params": {"w": rng.standard_normal((3, 4))}, "step": np.asarray(seed, np.int64)}


def restores(directory, step: int) -> bool:
    out = ckpt.restore(os.path.join(directory, ckpt.step_name(step)), tree(0))
    return np.array_equal(out["params"]["w"], tree(step)["params"]["w"])


def set_aside(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".corrupt-" in n)


def test_a_stray_step_directory_neither_counts_nor_costs_the_valid_checkpoints(tmp_path):
    """The issue's reproduction: with ``mkdir step_99999999``, keep=1 used to delete every valid checkpoint."""
    d = str(tmp_path)
    for step in (0, 2, 4):
        ckpt.save(d, step, tree(step), {}, keep=2)
    (tmp_path / "step_99999999").mkdir()
    ckpt.save(d, 6, tree(6), {}, keep=1)
    assert ckpt.list_steps(d) == [6] and restores(d, 6)
    assert set_aside(d) == [f"step_99999999.corrupt-{os.getpid()}"]  # renamed, not deleted
    assert ckpt.latest_valid(d, warn=pytest.fail).step == 6


def test_a_corrupt_checkpoint_does_not_count_toward_keep_and_is_set_aside(tmp_path):
    d = str(tmp_path)
    for step in (1, 2):
        ckpt.save(d, step, tree(step), {}, keep=3)
    manifest = tmp_path / "step_00000002" / ckpt.MANIFEST_FILE
    manifest.write_text(manifest.read_text()[:-10])  # step 2 fails verification
    ckpt.save(d, 3, tree(3), {}, keep=2)
    assert ckpt.list_steps(d) == [1, 3] and restores(d, 1) and restores(d, 3)  # 2 valid: 1 stays
    [aside] = set_aside(d)
    assert aside.startswith("step_00000002.corrupt-") and (tmp_path / aside / ckpt.MANIFEST_FILE).exists()


def test_pruning_never_deletes_the_checkpoint_just_written_nor_a_later_valid_one(tmp_path):
    d = str(tmp_path)
    ckpt.save(d, 8, tree(8), {}, keep=5)  # e.g. a checkpoint a resume fell back past
    ckpt.save(d, 2, tree(2), {}, keep=1)
    assert ckpt.list_steps(d) == [2, 8] and restores(d, 2)  # 8 is another history: left alone, not counted
    ckpt.save(d, 4, tree(4), {}, keep=1)
    assert ckpt.list_steps(d) == [4, 8] and restores(d, 4) and restores(d, 8)
    assert ckpt.prune(d, 1, newest=4) == [] and set_aside(d) == []


def test_prune_uses_orbax_latest_n_over_the_verified_checkpoints(tmp_path):
    d = str(tmp_path)
    for step in range(5):
        ckpt.save(d, step, tree(step), {}, keep=5)
    assert ckpt.prune(d, 2, newest=3) == [0, 1]  # the newest 2 up to step 3; step 4 is not counted
    assert ckpt.list_steps(d) == [2, 3, 4] and ckpt.leftovers(d) == []
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ckpt.prune(d, 0, newest=4)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_save_removes_no_live_process_staging_only_stale_ones_of_this_host(tmp_path):
    d = str(tmp_path)
    live, dead, host = os.getppid(), _dead_pid(), ckpt._host()
    keep = [f".tmp-step_00000005-{live}",  # format 1's staging of a live process
            f"step_00000005.orbax-checkpoint-tmp-{host}-{live}",  # of the step this test saves
            "step_00000005.orbax-checkpoint-tmp",  # orbax's own name: owner unknown
            f"step_00000005.orbax-checkpoint-tmp-another-host-{dead}",  # pid of another host
            f".del-step_00000001-{host}-{live}"]
    gone = [f".tmp-step_00000004-{dead}", f"step_00000004.orbax-checkpoint-tmp-{host}-{dead}",
            f".del-step_00000003-{host}-{dead}", f"step_00000003.orbax-checkpoint-tmp-{host}-{os.getpid()}"]
    for name in keep + gone:
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").write_text(name)
    ckpt.save(d, 5, tree(5), {}, keep=1)
    ckpt.save(d, 6, tree(6), {}, keep=1)
    assert ckpt.list_steps(d) == [6] and restores(d, 6)
    assert ckpt.leftovers(d) == sorted(keep)
    assert all((tmp_path / name / "data").read_text() == name for name in keep)


CONCURRENT = """
import sys
import numpy as np
from rate_tuning import checkpoint as ckpt
for step in range(1, 40, 2):
    ckpt.save(sys.argv[1], step, {"w": np.full(1000, float(step))}, {}, keep=100)
print("ok")
"""


@pytest.mark.slow
def test_concurrent_saves_in_two_processes_do_not_break_each_other(tmp_path):
    d = str(tmp_path)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    other = subprocess.Popen([sys.executable, "-c", CONCURRENT, d], env=env, cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not ckpt.list_steps(d) and other.poll() is None:  # start once the other one is saving
            time.sleep(0.05)
        for step in range(2, 41, 2):
            ckpt.save(d, step, {"w": np.full(1000, float(step))}, {}, keep=100)
    finally:
        out, err = other.communicate(timeout=120)
    assert (other.returncode, out, err) == (0, "ok\n", "")
    assert ckpt.list_steps(d) == list(range(1, 41)) and ckpt.leftovers(d) == []
    for step in (1, 2, 39, 40):
        assert ckpt.restore(os.path.join(d, ckpt.step_name(step)))["w"][0] == step


KILLED = """
import os, signal, sys
import numpy as np
from rate_tuning import checkpoint as ckpt
directory, seam, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
tree = lambda s: {"params": {"w": np.random.default_rng(s).standard_normal((3, 4))}, "step": np.asarray(s)}
for step in (1, 2):
    ckpt.save(directory, step, tree(step), {}, keep=2)
setattr(ckpt, seam, lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
ckpt.save(directory, 3, tree(3), {}, keep=keep)
"""


def test_sigkill_at_the_seams_leaves_a_usable_directory(tmp_path):
    """A process SIGKILLed at ``seal`` leaves only its staging (no new checkpoint), removed by the next save
    since its owner is gone; SIGKILLed at ``prune``, the new checkpoint is valid and the old ones intact."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    runs = {seam: subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path / seam), seam, "1"], env=env,
                                   cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for seam in ("seal", "prune")}
    for seam, proc in runs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, (seam, err)

    d = str(tmp_path / "seal")
    assert ckpt.list_steps(d) == [1, 2]
    [staging] = ckpt.leftovers(d)
    assert staging.startswith("step_00000003.orbax-checkpoint-tmp-") and staging.endswith(f"-{runs['seal'].pid}")
    assert ckpt.latest_valid(d, warn=pytest.fail).step == 2
    ckpt.save(d, 3, tree(3), {}, keep=2)
    assert ckpt.list_steps(d) == [2, 3] and ckpt.leftovers(d) == [] and restores(d, 3)

    d = str(tmp_path / "prune")
    assert ckpt.list_steps(d) == [1, 2, 3] and ckpt.leftovers(d) == []
    assert ckpt.latest_valid(d, warn=pytest.fail).step == 3
    ckpt.save(d, 4, tree(4), {}, keep=1)
    assert ckpt.list_steps(d) == [4] and restores(d, 4)
