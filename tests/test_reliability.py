"""The run directory under concurrency, pruning, signals, a full disk and any command line (issue 16).

Each test reproduces a failure seen by a hostile user and checks the contract: two runs on one workdir (the
second refused, the first as a lone run), a stray higher-numbered checkpoint directory (never counted, no
valid checkpoint deleted), SIGINT/SIGTERM at random moments (one line, 130/143, resumable bitwise), a disk
that fills up at a save (exit 1, one line, the previous checkpoint intact, resumable bitwise), and a
property-based test of the command line (exit status in {0, 2, 3}, one line, nothing touched on 2).
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rate_tuning import checkpoint as ckpt
from rate_tuning import cli, rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["data_kwargs.n_train=64", "data_kwargs.n_test=32", "data_kwargs.dim=6", "data_kwargs.num_classes=3",
        "data_kwargs.seed=1", "arch_kwargs.widths=8,8", "batch_size=16", "seed=3", "dtype=float64",
        "log_every=1", "eval_every=4"]
PINNED = "--xla_cpu_multi_thread_eigen=false"

pytestmark = pytest.mark.usefixtures("compilation_cache")


def env_for(cache) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {PINNED}".strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def start(workdir, overrides, cache, *, resume=False, entry=("-m", "rate_tuning.cli")) -> subprocess.Popen:
    argv = [sys.executable, *entry, "train", "--config", "synthetic", "--workdir", str(workdir),
            *(["--resume"] if resume else []), *overrides]
    return subprocess.Popen(argv, env=env_for(cache), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def final_arrays(workdir):
    found = ckpt.latest_valid(os.path.join(str(workdir), rundir.CHECKPOINTS_DIR))
    with jax.enable_x64(True):
        return found.step, jax.device_get(ckpt.restore(found.path))


def assert_same_run(ref_dir, run_dir):
    (s1, a), (s2, b) = final_arrays(ref_dir), final_arrays(run_dir)
    assert s1 == s2
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert (run_dir / "metrics.jsonl").read_bytes() == (ref_dir / "metrics.jsonl").read_bytes()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def lone_run(tmp_path_factory, cache):
    """The uninterrupted reference: 24 steps, checkpoints every 3."""
    workdir = tmp_path_factory.mktemp("lone") / "run"
    proc = start(workdir, [*TINY, "steps=24", "checkpoint_every=3"], cache)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return workdir


def wait_for(path, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------------
# One run at a time


@pytest.mark.slow
@pytest.mark.parametrize("resume", [False, True])
def test_a_second_run_on_a_workdir_is_refused_and_the_first_ends_as_a_lone_run(tmp_path, cache, lone_run, resume):
    run = tmp_path / "run"
    overrides = [*TINY, "steps=24", "checkpoint_every=3"]
    if resume:  # a killed run, then two --resume at once
        shutil.copytree(lone_run, run)
        (run / "summary.json").unlink()
        for step in ("step_00000024", "step_00000021"):
            shutil.rmtree(run / "checkpoints" / step, ignore_errors=True)
    first = start(run, overrides, cache, resume=resume)
    wait_for(run / rundir.LOCK_FILE, first)
    second = start(run, overrides, cache, resume=resume)
    out2, err2 = second.communicate(timeout=300)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == cli.EXIT_BAD_INPUT, (second.returncode, err2)
    lines = err2.strip().splitlines()
    assert len(lines) == 1 and f"is in use by another run (pid {first.pid})" in lines[0], err2
    assert_same_run(lone_run, run)
    assert not (run / rundir.LOCK_FILE).exists()  # released with the run


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / rundir.LOCK_FILE).write_text("999999\n")  # a file, but nobody holds the flock
    with rundir.RunLock(str(tmp_path)) as lock:
        assert (tmp_path / rundir.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(ValueError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            rundir.RunLock(str(tmp_path)).acquire()  # control: a held lock refuses
        assert lock.fd is not None
    assert not (tmp_path / rundir.LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------------
# Pruning


@pytest.mark.slow
def test_a_stray_checkpoint_directory_costs_no_valid_checkpoint(tmp_path, cache, lone_run):
    """Issue 16's reproduction: ``mkdir step_99999999`` then ``--resume ... keep_checkpoints=1``."""
    run = tmp_path / "run"
    shutil.copytree(lone_run, run)
    (run / "summary.json").unlink()
    for step in ("step_00000024", "step_00000021"):
        shutil.rmtree(run / "checkpoints" / step)
    (run / "checkpoints" / "step_99999999").mkdir()
    rc = cli.main(["train", "--config", "synthetic", "--workdir", str(run), "--resume", "--quiet", *TINY,
                   "steps=24", "checkpoint_every=3", "keep_checkpoints=1"])
    assert rc == 0
    steps = ckpt.list_steps(str(run / "checkpoints"))
    assert 24 in steps and 99999999 not in steps
    import json
    summary = json.loads((run / "summary.json").read_text())
    assert os.path.isdir(run / summary["checkpoint"])  # the summary names a checkpoint that exists
    assert_same_run(lone_run, run)


# ------------------------------------------------------------------------------------------------
# Signals


@pytest.mark.slow
def test_sigint_and_sigterm_at_random_moments_end_in_one_line_and_resume_bitwise(tmp_path, cache, lone_run):
    """20 signals at random moments from start-up to the final save (fixed seed): every run ends with one
    line and 130 (SIGINT) or 143 (SIGTERM); "continue with --resume" exactly when a checkpoint exists;
    resumed (or restarted, when nothing was saved), the run ends bitwise equal to the lone run."""
    rng = random.Random(16)
    overrides = [*TINY, "steps=24", "checkpoint_every=3"]
    for i in range(20):
        run = tmp_path / f"run{i}"
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        delay = rng.uniform(0.3, 6.0)  # from when the interpreter runs our code (its first ~0.1 s cannot be)
        proc = start(run, overrides, cache)
        time.sleep(delay)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
        if proc.returncode == 0:  # finished before the signal: nothing to check but the result
            assert_same_run(lone_run, run)
            continue
        expected = 130 if sig == signal.SIGINT else 143
        assert proc.returncode == expected, (i, delay, proc.returncode, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (i, delay, err)
        saved = bool(ckpt.list_steps(str(run / "checkpoints")))
        assert ("continue with --resume" in lines[0]) == saved, (i, lines[0])
        proc = start(run, overrides, cache, resume=saved)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (i, delay, err)
        assert_same_run(lone_run, run)


def test_an_interrupt_before_anything_is_saved_says_so(tmp_path, monkeypatch, capfd):
    """In-process: the handler's line for a run with no checkpoint (the process would end; here the test
    catches the exit)."""
    calls = []
    signals = cli.SignalPolicy()
    signals.exit = calls.append
    signals.workdir = str(tmp_path / "nothing")
    signals.handle(signal.SIGTERM, None)
    assert calls == [cli.EXIT_TERMINATED]
    (tmp_path / "run" / "checkpoints" / "step_00000003").mkdir(parents=True)
    signals.workdir = str(tmp_path / "run")
    signals.handle(signal.SIGINT, None)
    assert calls == [cli.EXIT_TERMINATED, cli.EXIT_INTERRUPTED]
    err = capfd.readouterr().err.splitlines()
    assert err[0] == "rate-tuning: terminated (nothing was saved)"
    assert err[1] == f"rate-tuning: interrupted (continue with --resume --workdir {tmp_path / 'run'})"


# ------------------------------------------------------------------------------------------------
# A full disk


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=30)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def _umount(path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, timeout=30)


@pytest.mark.slow
def test_a_full_disk_at_a_save_is_exit_1_keeps_the_previous_checkpoint_and_resumes_bitwise(tmp_path, cache,
                                                                                          lone_run):
    """A real tmpfs, too small for the whole run: every save that does not fit fails in one line with exit 1;
    the checkpoints before it verify; after the disk is enlarged (``remount``) the run resumes and ends
    bitwise equal to the lone run."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "400k"):
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        run = disk / "run"
        overrides = [*TINY, "steps=24", "checkpoint_every=3", "keep_checkpoints=8"]
        proc = start(run, overrides, cache)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == cli.EXIT_OS_ERROR, (proc.returncode, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in err, err
        steps = ckpt.list_steps(str(run / "checkpoints"))
        assert steps, "400k holds at least the first checkpoint"
        for step in steps:
            ckpt.verify(str(run / "checkpoints" / ckpt.step_name(step)))
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True, capture_output=True)
        proc = start(run, overrides, cache, resume=True)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        shutil.copytree(run, tmp_path / "copy")
    finally:
        _umount(disk)
    assert_same_run(lone_run, tmp_path / "copy")


@pytest.mark.parametrize("at", [0, 3, 6, 24])
def test_a_failed_save_at_every_checkpoint_is_exit_1_and_resumes_bitwise(tmp_path, monkeypatch, capsys, lone_run,
                                                                         at):
    """ENOSPC raised inside the save of step ``at`` (the first, a middle one, the final one): one line,
    exit 1, the earlier checkpoints intact; the resumed run (a new one when nothing was saved) is the lone
    run's."""
    seal = ckpt.seal

    def full_at(staging, step):
        if step == at:
            raise OSError(28, "No space left on device")
        return seal(staging, step)

    run = tmp_path / "run"
    argv = ["train", "--config", "synthetic", "--workdir", str(run), "--quiet", *TINY, "steps=24",
            "checkpoint_every=3"]
    with monkeypatch.context() as m:
        m.setattr(ckpt, "seal", full_at)
        rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == cli.EXIT_OS_ERROR and len(err) == 1 and "No space left on device" in err[0], err
    steps = ckpt.list_steps(str(run / "checkpoints"))
    assert steps == [s for s in (0, 3, 6, 9, 12, 15, 18, 21) if s < at][-3:]  # keep_checkpoints=3
    for step in steps:
        ckpt.verify(str(run / "checkpoints" / ckpt.step_name(step)))
    if steps:
        assert cli.main([*argv, "--resume"]) == 0
    else:
        shutil.rmtree(run)
        assert cli.main(argv) == 0
    (_, a), (_, b) = final_arrays(lone_run), final_arrays(run)
    assert all(np.allclose(x, y, rtol=1e-12, atol=0) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))  # in-process vs subprocess threads


# ------------------------------------------------------------------------------------------------
# Any command line


def tree_hash(root) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode("utf-8", "surrogateescape"))
            if not os.path.islink(path):
                with open(path, "rb") as f:
                    h.update(f.read())
        for name in dirnames:
            h.update(os.path.relpath(os.path.join(dirpath, name), root).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


FRAGMENTS = st.sampled_from([
    "steps=2", "steps=0", "steps=-1", "steps=1e400", "steps=2147483648", "seed=4294967296", "seed=-1", "seed=7",
    "lr_w=1e30", "lr_w=0", "lr_w=nan", "lr_g=1e100", "lr_g=abc", "batch_size=0", "batch_size=100000",
    "dtype=float16", "dtype=float32", "momentum=0.9", "momentum=1", "weight_decay=1e-3", "grouping=channel",
    "preset=smoothed", "preset=no_bn", "bn=standard", "arch=convnet", "arch_kwargs.widths=4", "arch_kwargs.widths=0",
    "arch_kwargs.widths=100000,100000", "data_kwargs.n_train=100000000000", "data_kwargs.dim=0", "keep_checkpoints=0",
    "checkpoint_every=1", "log_every=0", "eval_every=1", "=3", "nokey", "arch_kwargs=" + "[" * 50, "--devices",
    "--resume", "--bogus", "x=1",
])
WORKDIR_STATES = st.sampled_from(["absent", "empty", "file", "finished", "killed", "loop"])


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fragments=st.lists(FRAGMENTS, max_size=5), state=WORKDIR_STATES)
def test_any_command_line_keeps_the_contract(tmp_path_factory, lone_run, capsys, fragments, state):
    root = tmp_path_factory.mktemp("cli")
    wd = root / "wd"
    if state == "empty":
        wd.mkdir()
    elif state == "file":
        wd.write_text("x")
    elif state in ("finished", "killed"):
        shutil.copytree(lone_run, wd)
        if state == "killed":
            (wd / "summary.json").unlink()
    elif state == "loop":
        os.symlink("wd", wd)
    argv = ["train", "--config", "synthetic", "--workdir", str(wd), "--quiet", *TINY[:-2], "steps=3", *fragments]
    before = tree_hash(root)
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc in (0, 2, 3), (argv, rc, err)
    assert "Traceback" not in out + err
    if rc in (2, 3):
        assert len(err.strip().splitlines()) == 1 and err.startswith("rate-tuning: error: "), (argv, err)
    if rc == 2:
        assert tree_hash(root) == before, argv


@pytest.mark.slow
def test_a_rate_that_overflows_float32_diverges_in_one_line(tmp_path, cache):
    """lr_w = 1e30 in float32: the norms overflow at the first step (||w_1||^2 ~ lr_w^2 ||g||^2 > 3.4e38), so
    the run diverges, exit 3, with the one line that names the step and groups and no numpy cast warning
    before it (the record squares the rate in the params' dtype). A subprocess: pytest would swallow the
    warning."""
    proc = start(tmp_path / "run", ["lr_w=1e30", "dtype=float32", "steps=4", "--quiet"], cache)
    out, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == cli.EXIT_DIVERGED, err
    assert len(lines) == 1 and lines[0].startswith("rate-tuning: error: diverged at step"), err
