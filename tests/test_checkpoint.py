"""Tests of rate_tuning.checkpoint: round trip, keep-last-N, atomic finalisation, corruption detection and
fallback, one-line errors. No training here (tests/test_resume.py runs whole runs)."""
from __future__ import annotations

import json
import os
import shutil
from typing import NamedTuple

import jax
import numpy as np
import pytest

from rate_tuning import checkpoint as ckpt


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


def test_an_interrupted_save_leaves_no_checkpoint_and_is_cleaned_up(tmp_path, x64):
    ckpt.save(str(tmp_path), 3, tree(3), {}, keep=2)

    class Killed(BaseException):
        pass

    def die():
        raise Killed  # stands for SIGKILL after all files are written, before the rename

    with pytest.raises(Killed):
        ckpt.save(str(tmp_path), 6, tree(6), {}, keep=2, before_finalize=die)
    assert ckpt.list_steps(str(tmp_path)) == [3]  # the half-made checkpoint is not one
    assert [n.startswith(".tmp-step_00000006") for n in ckpt.leftovers(str(tmp_path))] == [True]
    assert ckpt.latest_valid(str(tmp_path)).step == 3
    ckpt.save(str(tmp_path), 6, tree(6), {}, keep=2)  # the next save removes the leftover
    assert ckpt.leftovers(str(tmp_path)) == [] and ckpt.list_steps(str(tmp_path)) == [3, 6]


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
