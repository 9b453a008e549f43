"""Tests of rate_tuning.checkpoint: round trip, keep-last-N, atomic finalisation, corruption detection and
fallback, one-line errors. No training here (tests/test_resume.py runs whole runs)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from typing import NamedTuple

import jax
import numpy as np
import pytest

from rate_tuning import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Opt(NamedTuple):
    count: np.ndarray
    trace: dict


class Empty(NamedTuple):
    pass


def tree(seed: int = 0) -> dict:
    """A state-shaped pytree: nested dicts, a named tuple, an empty node, float64, int and uint32 leaves."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((3, 4))
    return {"params": {"layer0": {"kernel": w}, "bn": {"scale": rng.standard_normal(4)}},
            "batch_stats": {},
            "opt_state": (Opt(np.asarray(seed, np.int32), {"layer0": {"kernel": -w}}), Empty()),
            "step": np.asarray(seed, np.int64),
            "rng": np.asarray([0, seed], np.uint32)}


def assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise for floats without NaN


def test_round_trip_is_bitwise_with_structure_and_dtypes(tmp_path, x64):
    t = tree(7)
    path = ckpt.save(str(tmp_path), 7, t, {"note": "hello"}, keep=3)
    assert os.path.basename(path) == "step_00000007" and ckpt.list_steps(str(tmp_path)) == [7]
    assert ckpt.verify(path) == {"note": "hello", "step": 7}
    assert_same(ckpt.restore(path, tree(0)), t)  # the target gives structure and dtypes, not values
    raw = ckpt.restore(path)  # without a target: plain dicts/lists
    np.testing.assert_array_equal(raw["params"]["layer0"]["kernel"], t["params"]["layer0"]["kernel"])
    assert raw["params"]["layer0"]["kernel"].dtype == np.float64
    manifest = json.loads((tmp_path / "step_00000007" / ckpt.MANIFEST_FILE).read_text())
    assert manifest["format"] == ckpt.FORMAT_VERSION and "meta.json" in manifest["files"]
    assert any(f.startswith("state/") for f in manifest["files"])


def test_keep_last_n_and_no_leftovers(tmp_path, x64):
    for step in range(6):
        ckpt.save(str(tmp_path), step, tree(step), {}, keep=2)
    assert ckpt.list_steps(str(tmp_path)) == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["step_00000004", "step_00000005"]  # no .tmp-/.del- left
    assert ckpt.latest_valid(str(tmp_path)).step == 5
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ckpt.save(str(tmp_path), 9, tree(), {}, keep=0)


class Killed(BaseException):
    """Stands for SIGKILL at a crash-test seam (a subprocess test below sends the real one)."""


def die_at(monkeypatch, seam: str):
    """Make ``ckpt.<seam>`` ('seal' or 'prune') raise Killed instead of running."""
    def die(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(ckpt, seam, die)


def test_an_interrupted_save_leaves_no_checkpoint_and_is_cleaned_up(tmp_path, x64, monkeypatch):
    ckpt.save(str(tmp_path), 3, tree(3), {}, keep=2)
    with monkeypatch.context() as m:
        die_at(m, "seal")  # everything written and fsync'ed, no manifest, not renamed into place
        with pytest.raises(Killed):
            ckpt.save(str(tmp_path), 6, tree(6), {}, keep=2)
    assert ckpt.list_steps(str(tmp_path)) == [3]  # the half-made checkpoint is not one
    [staging] = ckpt.leftovers(str(tmp_path))
    assert staging.startswith("step_00000006.orbax-checkpoint-tmp-") and staging.endswith(f"-{os.getpid()}")
    assert ckpt.latest_valid(str(tmp_path), warn=pytest.fail).step == 3
    ckpt.save(str(tmp_path), 6, tree(6), {}, keep=2)  # its owner (this process) removes the leftover
    assert ckpt.leftovers(str(tmp_path)) == [] and ckpt.list_steps(str(tmp_path)) == [3, 6]
    assert_same(ckpt.restore(str(tmp_path / "step_00000006"), tree()), tree(6))


def test_a_save_interrupted_before_pruning_leaves_the_new_checkpoint_and_the_old_ones(tmp_path, x64, monkeypatch):
    for step in (1, 2):
        ckpt.save(str(tmp_path), step, tree(step), {}, keep=2)
    with monkeypatch.context() as m:
        die_at(m, "prune")
        with pytest.raises(Killed):
            ckpt.save(str(tmp_path), 3, tree(3), {}, keep=1)
    assert ckpt.list_steps(str(tmp_path)) == [1, 2, 3] and ckpt.leftovers(str(tmp_path)) == []
    assert ckpt.latest_valid(str(tmp_path), warn=pytest.fail).step == 3  # valid before pruning
    ckpt.save(str(tmp_path), 4, tree(4), {}, keep=1)
    assert ckpt.list_steps(str(tmp_path)) == [4]


def _largest_array_file(path: str) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(path, ckpt.ARRAYS_DIR)) for f in fs]
    return max(files, key=os.path.getsize)


def _truncate(path):
    f = _largest_array_file(path)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)


def _flip(path):
    f = _largest_array_file(path)
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(f, "wb").write(bytes(data))


def _delete(path):
    os.remove(_largest_array_file(path))


def _garbage_manifest(path):
    (open(os.path.join(path, ckpt.MANIFEST_FILE), "w")).write('{"format": 1, "files": {"meta.js')


def _no_manifest(path):
    os.remove(os.path.join(path, ckpt.MANIFEST_FILE))


def _future_format(path):
    m = os.path.join(path, ckpt.MANIFEST_FILE)
    obj = json.load(open(m))
    obj["format"] = 99
    json.dump(obj, open(m, "w"))


def _edited_meta(path):
    m = os.path.join(path, ckpt.META_FILE)
    open(m, "a").write(" ")  # same JSON, one byte more: the size check catches it


CORRUPTIONS = {
    "truncated array file": (_truncate, "is truncated or resized"),
    "flipped byte in an array file": (_flip, "SHA-256 differs"),
    "deleted array file": (_delete, "is missing"),
    "garbage manifest": (_garbage_manifest, "MANIFEST.json is unreadable"),
    "missing manifest": (_no_manifest, "MANIFEST.json is missing"),
    "manifest of a future format": (_future_format, "format 99"),
    "edited meta.json": (_edited_meta, "meta.json is truncated or resized"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_is_detected_and_the_previous_checkpoint_used(case, tmp_path, x64):
    corrupt, reason = CORRUPTIONS[case]
    for step in (2, 4):
        ckpt.save(str(tmp_path), step, tree(step), {"k": step}, keep=3)
    newest = str(tmp_path / "step_00000004")
    corrupt(newest)
    with pytest.raises(ckpt.CheckpointError, match=reason):
        ckpt.verify(newest)
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint step_00000004 is corrupt .*{reason}"):
        ckpt.restore(newest, tree())
    warnings = []
    found = ckpt.latest_valid(str(tmp_path), warn=warnings.append)
    assert (found.step, found.meta) == (2, {"k": 2, "step": 2})
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("checkpoint step_00000004 is corrupt (") and reason in warnings[0]
    assert warnings[0].endswith("falling back to step_00000002")
    assert_same(ckpt.restore(found.path, tree()), tree(2))


def test_no_valid_checkpoint_names_each_one_and_its_reason(tmp_path, x64):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in"):
        ckpt.latest_valid(str(tmp_path / "missing"))
    for step in (1, 2):
        ckpt.save(str(tmp_path), step, tree(step), {}, keep=3)
    _truncate(str(tmp_path / "step_00000002"))
    _no_manifest(str(tmp_path / "step_00000001"))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.latest_valid(str(tmp_path), warn=pytest.fail)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"no valid checkpoint in {tmp_path}: step_00000002: file state/")
    assert "step_00000001: MANIFEST.json is missing" in msg


def test_a_checkpoint_of_another_model_is_a_one_line_error(tmp_path, x64):
    path = ckpt.save(str(tmp_path), 1, tree(1), {}, keep=1)
    other = tree(1)
    other["params"]["layer0"]["kernel"] = np.zeros((5, 4))
    del other["params"]["bn"]
    with pytest.raises(ckpt.CheckpointError, match="step_00000001 cannot be restored into this model's state") as e:
        ckpt.restore(path, other)
    assert "\n" not in str(e.value)


def test_a_failed_save_is_a_write_error_and_keeps_earlier_checkpoints(tmp_path, x64, capsys):
    ckpt.save(str(tmp_path), 1, tree(1), {}, keep=1)
    bad = tree(2)
    bad["params"]["oops"] = "not an array"
    with pytest.raises(ckpt.CheckpointWriteError, match="could not write checkpoint step_00000002") as e:
        ckpt.save(str(tmp_path), 2, bad, {}, keep=1)
    assert isinstance(e.value, OSError) and "\n" not in str(e.value)
    assert "Traceback" not in capsys.readouterr().err  # orbax's thread tracebacks are not printed
    assert ckpt.list_steps(str(tmp_path)) == [1] and ckpt.leftovers(str(tmp_path)) == []
    assert_same(ckpt.restore(str(tmp_path / "step_00000001"), tree()), tree(1))


def test_saving_over_a_corrupt_checkpoint_sets_it_aside(tmp_path, x64):
    ckpt.save(str(tmp_path), 4, tree(4), {}, keep=2)
    _truncate(str(tmp_path / "step_00000004"))
    ckpt.save(str(tmp_path), 4, tree(4), {}, keep=2)  # a resumed run reaches step 4 again
    names = sorted(os.listdir(tmp_path))
    assert names[0] == "step_00000004" and names[1].startswith("step_00000004.corrupt-")  # kept, not deleted
    assert_same(ckpt.restore(str(tmp_path / "step_00000004"), tree()), tree(4))
    shutil.rmtree(tmp_path / names[1])
    ckpt.save(str(tmp_path), 4, tree(5), {}, keep=2)  # over a valid one: set aside as replaced
    names = sorted(os.listdir(tmp_path))
    assert names[0] == "step_00000004" and names[1].startswith("step_00000004.replaced-")
    assert_same(ckpt.restore(str(tmp_path / names[1]), tree()), tree(4))


# ------------------------------------------------------------------------------------------------
# restore_latest, bounded JSON, write errors, processes.


def other_model(seed: int = 0) -> dict:
    """A tree that verifies as a checkpoint but does not fit :func:`tree`'s structure (another model)."""
    t = tree(seed)
    t["params"]["layer0"]["kernel"] = np.zeros((5, 4))
    del t["params"]["bn"]
    return t


def test_restore_latest_falls_back_past_checkpoints_that_do_not_restore(tmp_path, x64):
    ckpt.save(str(tmp_path), 1, tree(1), {}, keep=5)
    ckpt.save(str(tmp_path), 2, other_model(2), {}, keep=5)  # verifies, but orbax cannot fit it to tree()
    ckpt.save(str(tmp_path), 3, tree(3), {}, keep=5)
    _truncate(str(tmp_path / "step_00000003"))
    assert ckpt.latest_valid(str(tmp_path), warn=lambda m: None).step == 2  # verification alone stops at 2
    warnings = []
    found, restored = ckpt.restore_latest(str(tmp_path), tree(), warn=warnings.append)
    assert (found.step, found.meta) == (1, {"step": 1}) and found.path == str(tmp_path / "step_00000001")
    assert_same(restored, tree(1))
    assert len(warnings) == 2 and all("\n" not in w and w.endswith("falling back to step_00000001") for w in warnings)
    assert warnings[0].startswith("checkpoint step_00000003 is corrupt (file state/")
    assert warnings[1].startswith("checkpoint step_00000002 cannot be restored into this model's state (")
    found, restored = ckpt.restore_latest(str(tmp_path), other_model(), warn=warnings.append)  # the other model
    assert found.step == 2 and restored["params"]["layer0"]["kernel"].shape == (5, 4)


def test_restore_latest_raises_when_none_restores(tmp_path, x64):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in"):
        ckpt.restore_latest(str(tmp_path), tree())
    ckpt.save(str(tmp_path), 1, other_model(1), {}, keep=5)
    ckpt.save(str(tmp_path), 2, tree(2), {}, keep=5)
    _no_manifest(str(tmp_path / "step_00000002"))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.restore_latest(str(tmp_path), tree(), warn=pytest.fail)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"no valid checkpoint in {tmp_path}: step_00000002: MANIFEST.json is missing; ")
    assert "step_00000001: cannot be restored into this model's state (" in msg


def _rewrite(path, rel: str, data: bytes) -> None:
    """Replace the file ``rel`` of the checkpoint ``path`` with ``data`` and list it in the manifest, so that
    only the content itself is wrong."""
    with open(os.path.join(path, rel), "wb") as f:
        f.write(data)
    m = os.path.join(path, ckpt.MANIFEST_FILE)
    with open(m) as f:
        manifest = json.load(f)
    manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with open(m, "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize("case", ["manifest", "meta", "huge manifest"])
def test_deep_or_huge_json_is_a_one_line_error(case, tmp_path, x64):
    for step in (1, 2):
        ckpt.save(str(tmp_path), step, tree(step), {}, keep=3)
    newest = str(tmp_path / "step_00000002")
    if case == "manifest":
        with open(os.path.join(newest, ckpt.MANIFEST_FILE), "w") as f:
            f.write("[" * 100_000)
        reason = "MANIFEST.json is unreadable (it is nested deeper than 64 levels)"
    elif case == "meta":
        _rewrite(newest, ckpt.META_FILE, b"[" * 100_000)
        reason = "meta.json is unreadable (it is nested deeper than 64 levels)"
    else:
        with open(os.path.join(newest, ckpt.MANIFEST_FILE), "r+b") as f:
            f.truncate((16 << 20) + 1)  # sparse: a JSON prefix, then zeros
        reason = "MANIFEST.json is unreadable (it is larger than 16777216 bytes)"
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.verify(newest)
    assert str(e.value) == reason
    warnings = []
    assert ckpt.latest_valid(str(tmp_path), warn=warnings.append).step == 1
    assert warnings == [f"checkpoint step_00000002 is corrupt ({reason}); falling back to step_00000001"]


def test_a_disk_full_error_is_a_one_line_write_error_that_removes_the_staging(tmp_path, x64, monkeypatch, capsys):
    ckpt.save(str(tmp_path), 1, tree(1), {}, keep=1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "seal", full)  # inside orbax's commit, after every array is written
    with pytest.raises(ckpt.CheckpointWriteError) as e:
        ckpt.save(str(tmp_path), 2, tree(2), {}, keep=1)
    assert str(e.value) == (f"could not write checkpoint step_00000002 in {tmp_path}: "
                            f"No space left on device")  # the same words whichever layer saw it
    assert capsys.readouterr().err == ""  # nothing from orbax or asyncio
    assert ckpt.list_steps(str(tmp_path)) == [1] and ckpt.leftovers(str(tmp_path)) == []
    assert_same(ckpt.restore(str(tmp_path / "step_00000001"), tree()), tree(1))


FILE_SIZE_LIMIT = """
import os, resource, signal, sys
import numpy as np
from rate_tuning import checkpoint as ckpt
directory = sys.argv[1]
ckpt.save(directory, 1, {"w": np.ones(4)}, {}, keep=1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    ckpt.save(directory, 2, {"w": np.random.default_rng(0).standard_normal(1 << 17)}, {}, keep=1)
except ckpt.CheckpointWriteError as e:
    print(f"CheckpointWriteError: {e}")
"""


def test_a_write_that_fails_in_orbax_is_a_one_line_error_and_prints_nothing(tmp_path):
    """A real write failure inside orbax's tensorstore writer (files limited to 64 KiB, 1 MiB of arrays), in
    a subprocess: one line, nothing on stderr, no staging left, the earlier checkpoint intact."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    [line] = done.stdout.splitlines()
    assert line.startswith(f"CheckpointWriteError: could not write checkpoint step_00000002 in {tmp_path}: ")
    assert ckpt.list_steps(str(tmp_path)) == [1] and ckpt.leftovers(str(tmp_path)) == []
    np.testing.assert_array_equal(ckpt.restore(str(tmp_path / "step_00000001"))["w"], np.ones(4))


def test_orbax_names_and_lists_the_steps_as_step_name_does(tmp_path):
    assert ckpt.step_name(123) == "step_00000123" and ckpt.step_name(123456789) == "step_123456789"
    assert [ckpt._name_format().build_name(s) for s in (123, 123456789)] == ["step_00000123", "step_123456789"]
    for name in ("step_00000123", "step_123456789", "step_00000007.corrupt-9", "step_1", ".tmp-step_00000008-1",
                 "step_00000009.orbax-checkpoint-tmp-h-1"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_00000010").write_text("a file")
    assert ckpt.list_steps(str(tmp_path)) == [123, 123456789]
    assert ckpt.leftovers(str(tmp_path)) == [".tmp-step_00000008-1", "step_00000009.orbax-checkpoint-tmp-h-1"]


def test_with_several_processes_process_0_alone_saves_and_orbax_waits_for_no_other(tmp_path, monkeypatch):
    """(Real 2-process runs that checkpoint are in tests/test_cli.py.)"""
    import orbax.checkpoint as ocp

    assert ckpt._multiprocessing_options() == ocp.options.MultiprocessingOptions()
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax, "process_index", lambda: 2)
    options = ckpt._multiprocessing_options()
    assert (options.primary_host, options.active_processes) == (2, {2})
    assert options.barrier_sync_key_prefix == "rate_tuning_2"
    with pytest.raises(ValueError, match="saved by JAX process 0 only .* this is process 2 of 4"):
        ckpt.save(str(tmp_path), 1, tree(1), {}, keep=1)  # orbax would write no array from process 2
    assert os.listdir(tmp_path) == []
