"""Bad input never costs data (issue 6): a table of bad inputs to ``rate-tuning``, each giving one clear
line on stderr, exit status 2, no traceback, and no file written, changed or deleted anywhere (the whole
test directory is hashed before and after: for the resume cases this is "nothing already saved is lost").
Then property-based tests (hypothesis) of config parsing.

tests/test_cli.py has the first bad-input table (16 rows: the basics); this one has other rows and
checkpoints, resumption, label trees, data files and the command line, with the stricter checks above.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import string
import typing
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rate_tuning import checkpoint as ckpt
from rate_tuning import cli, configs, models, rundir
from rate_tuning import groups as G
from rate_tuning.configs import Config, ConfigError

RUN = ["data_kwargs.n_train=64", "data_kwargs.n_test=32", "data_kwargs.dim=6", "data_kwargs.num_classes=3",
       "data_kwargs.seed=1", "arch_kwargs.widths=8,8", "batch_size=16", "seed=3", "dtype=float64", "steps=4",
       "log_every=1", "checkpoint_every=2", "keep_checkpoints=2"]
"""The tiny float64 run of every row (the model of tests/test_resume.py, so compilations are shared)."""


pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete tiny run: metrics.jsonl, summary.json, checkpoints step 2 and step 4."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", "--config", "synthetic", "--workdir", str(workdir), "--quiet", *RUN]) == 0
    assert ckpt.list_steps(str(workdir / "checkpoints")) == [2, 4]
    return workdir


# ------------------------------------------------------------------------------------------------
# Set-ups: each prepares tmp_path/wd (the workdir of the row) or tmp_path/data.


def killed_run(wd, finished):
    """A run killed after its last checkpoint, before summary.json: resumable."""
    shutil.copytree(finished, wd)
    os.remove(wd / "summary.json")


def only_checkpoint_corrupt(wd, finished):
    killed_run(wd, finished)
    shutil.rmtree(wd / "checkpoints" / "step_00000002")
    data = max((p for p in (wd / "checkpoints" / "step_00000004").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:-1])


def future_format(wd, finished):
    killed_run(wd, finished)
    for step in ("step_00000002", "step_00000004"):
        manifest = wd / "checkpoints" / step / ckpt.MANIFEST_FILE
        obj = json.loads(manifest.read_text())
        obj["format"] = 99
        manifest.write_text(json.dumps(obj))


def corrupt_metrics(wd, finished):
    killed_run(wd, finished)
    lines = (wd / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"  # damage in the middle: not what a kill leaves
    (wd / "metrics.jsonl").write_text("".join(lines))


def staging_only(wd, finished):
    (wd / "checkpoints" / ".tmp-step_00000000-1").mkdir(parents=True)
    (wd / "metrics.jsonl").write_text("")


def checkpoints_only(wd, finished):
    killed_run(wd, finished)
    os.remove(wd / "metrics.jsonl")


def empty_dir(wd, finished):
    wd.mkdir()


def a_file(wd, finished):
    wd.write_text("not a directory\n")


# Issue 16: paths, sizes, JSON depth, locks, resume gaps


def symlink_loop(wd, finished):
    wd.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(wd.name, wd)


def dangling_symlink(wd, finished):
    wd.parent.mkdir(parents=True, exist_ok=True)
    os.symlink("nowhere", wd)


def entry_of_the_wrong_kind(name: str, kind: str, resumable: bool = False):
    def setup(wd, finished):
        if resumable:
            killed_run(wd, finished)
            target = wd / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        else:
            wd.mkdir()
        (wd / name).mkdir() if kind == "dir" else (wd / name).write_text("x")
    return setup


DEEP = "[" * 100000


def deep_manifests(wd, finished):
    killed_run(wd, finished)
    for step in ("step_00000002", "step_00000004"):
        (wd / "checkpoints" / step / ckpt.MANIFEST_FILE).write_text(DEEP)


def deep_meta(wd, finished):
    """meta.json nested 100000 deep, with a manifest that vouches for it (size and SHA-256 updated)."""
    killed_run(wd, finished)
    for step in ("step_00000002", "step_00000004"):
        d = wd / "checkpoints" / step
        (d / ckpt.META_FILE).write_text(DEEP)
        manifest = json.loads((d / ckpt.MANIFEST_FILE).read_text())
        manifest["files"][ckpt.META_FILE] = {"size": len(DEEP), "sha256": hashlib.sha256(DEEP.encode()).hexdigest()}
        (d / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


def deep_metrics_line(wd, finished):
    killed_run(wd, finished)
    lines = (wd / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = DEEP + "\n"
    (wd / "metrics.jsonl").write_text("".join(lines))


def metrics_missing(wd, finished):
    killed_run(wd, finished)
    os.remove(wd / "metrics.jsonl")
    shutil.rmtree(wd / "checkpoints" / "step_00000002")  # resume from step 4: records 0..3 are needed


def metrics_without_its_start(wd, finished):
    killed_run(wd, finished)
    lines = (wd / "metrics.jsonl").read_text().splitlines(keepends=True)
    (wd / "metrics.jsonl").write_text("".join(lines[1:]))


HELD_LOCKS: list[int] = []


def held_lock(resumable: bool):
    """Another run holds the directory's lock (an flock on another open file: as good as another process)."""
    def setup(wd, finished):
        killed_run(wd, finished) if resumable else wd.mkdir()
        fd = os.open(wd / rundir.LOCK_FILE, os.O_RDWR | os.O_CREAT)
        os.write(fd, b"4242\n")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        HELD_LOCKS.append(fd)
    return setup


@pytest.fixture(autouse=True)
def release_held_locks():
    yield
    while HELD_LOCKS:
        os.close(HELD_LOCKS.pop())


def _write_idx(path, magic: int, dims: tuple[int, ...], extra: int = 0):
    n = math.prod(dims)
    body = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + bytes(n)
    path.write_bytes(body[:len(body) + extra] if extra < 0 else body + bytes(extra))


def fashion(*, labels_truncated=False, bad_magic=False, label_count=None, missing=None):
    def setup(wd, finished):
        d = wd.parent / "data"
        d.mkdir()
        for prefix, n in (("train", 12), ("t10k", 6)):
            _write_idx(d / f"{prefix}-images-idx3-ubyte", 0x0803 if not bad_magic else 0x0802, (n, 28, 28))
            _write_idx(d / f"{prefix}-labels-idx1-ubyte", 0x0801, (label_count or n,),
                       extra=-3 if labels_truncated and prefix == "t10k" else 0)
        if missing:
            os.remove(d / missing)
    return setup


# Label trees (monkeypatched presets)


def _patch_labels(edit):
    def patch(monkeypatch):
        real = models.BNNet.labels

        def labels(self, grouping="layer"):
            tree = real(self, grouping)
            edit(tree)
            return tree

        monkeypatch.setattr(models.BNNet, "labels", labels)
    return patch


def _ghost(tree):
    tree["ghost"] = {"kernel": G.si("ghost")}


def _variant_as_si(tree):
    tree["bn_out"]["scale"] = G.si("bn_out:scale")


@dataclasses.dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    expect: str
    setup: Callable | None = None
    patch: Callable | None = None


T = ("train", "--config", "synthetic", *RUN)
R = ("train", "--config", "synthetic", "--workdir", "{wd}", "--resume", *RUN)

BAD = {
    # ---- configs
    "unknown config name": Case(("train", "--config", "synthetc"), "unknown config 'synthetc'; known configs:"),
    "unknown key": Case((*T, "lr=0.1"), "unknown config key 'lr'; known keys:"),
    "unparsable integer": Case((*T, "batch_size=big"), "'batch_size': cannot parse 'big' as an integer"),
    "integer overflow": Case((*T, "steps=1e400"), "'steps': cannot parse '1e400' as an integer"),
    "boolean of the wrong type": Case((*T, "verify_labels=maybe"), "'verify_labels': cannot parse 'maybe'"),
    "negative steps": Case((*T, "steps=-5"), "steps must be an integer in [1, 2147483647], got -5"),
    "zero log_every": Case((*T, "log_every=0"), "log_every must be an integer >= 1, got 0"),
    "negative eval_every": Case((*T, "eval_every=-1"), "eval_every must be an integer >= 0"),
    "negative checkpoint_every": Case((*T, "checkpoint_every=-1"), "checkpoint_every must be an integer >= 0"),
    "keep no checkpoint": Case((*T, "keep_checkpoints=0"), "keep_checkpoints must be an integer >= 1, got 0"),
    "batch larger than the data": Case((*T, "batch_size=65"), "batch_size=65 exceeds the 64 training examples"),
    "unknown arch": Case((*T, "arch=transformer"), "unknown arch 'transformer'; known: mlp"),
    "unknown preset": Case((*T, "preset=magic"), "unknown preset 'magic'"),
    "unknown bn": Case((*T, "bn=layernorm"), "unknown bn 'layernorm'"),
    "unknown grouping": Case((*T, "grouping=neuron"), "unknown grouping 'neuron'"),
    "unknown schedule": Case((*T, "schedule=linear"), "unknown schedule 'linear'"),
    "dtype float16": Case((*T, "dtype=float16"), "unknown dtype 'float16'; known: float32, float64"),
    "dtype int32": Case((*T, "dtype=int32"), "unknown dtype 'int32'"),
    "momentum of 1.5": Case((*T, "momentum=1.5"), "momentum must be in [0, 1), got 1.5"),
    "nan weight decay": Case((*T, "weight_decay=nan"), "weight_decay must be a finite number >= 0, got nan"),
    "dict field given a tuple": Case((*T, "data_kwargs=(1,2)"), "'data_kwargs': cannot parse"),
    "dotted entry on a number": Case((*T, "steps.max=3"), "only the dict fields"),
    "arch_kwargs typo": Case((*T, "arch_kwargs.width=8"), "unexpected keyword argument 'width'"),
    "width of a string": Case((*T, "arch_kwargs.widths=('a',)"), "widths must be positive integers, got ('a',)"),
    "zero width": Case((*T, "arch_kwargs.widths=(0,)"), "widths must be positive integers, got (0,)"),
    "convnet on vectors": Case((*T, "arch=convnet"), "arch 'convnet' needs image inputs"),
    "empty training set": Case((*T, "data_kwargs.n_train=0"), "n_train must be an integer >= 1, got 0"),
    "data_kwargs typo": Case((*T, "data_kwargs.colour=1"), "unexpected keyword argument 'colour'"),
    # ---- learning rates
    "lr_g zero": Case((*T, "lr_g=0"), "lr_g must be a positive finite number, got 0.0"),
    "lr_g negative": Case((*T, "lr_g=-1"), "lr_g must be a positive finite number, got -1.0"),
    "lr_g nan": Case((*T, "lr_g=nan"), "lr_g must be a positive finite number, got nan"),
    "lr_w minus infinity": Case((*T, "lr_w=-inf"), "lr_w must be a positive finite number, got -inf"),
    "lr_w overflows to inf": Case((*T, "lr_w=1e400"), "lr_w must be a positive finite number, got inf"),
    "lr_w text": Case((*T, "lr_w=abc"), "'lr_w': cannot parse 'abc' as a number"),
    # ---- data files
    "missing CIFAR-10 directory": Case((*T, "dataset=cifar10", "data_kwargs={'path': '{wd}/nowhere'}"),
                                       "nowhere"),
    "truncated IDX labels": Case(("train", "--config", "fashion_mnist", "data_kwargs.path={data}"),
                                 "t10k-labels-idx1-ubyte is truncated", fashion(labels_truncated=True)),
    "IDX bad magic": Case(("train", "--config", "fashion_mnist", "data_kwargs.path={data}"),
                          "has bad magic number 0x00000802, expected 0x00000803", fashion(bad_magic=True)),
    "IDX wrong label count": Case(("train", "--config", "fashion_mnist", "data_kwargs.path={data}"),
                                  "disagree: 12 images but 7 labels", fashion(label_count=7)),
    "IDX file missing": Case(("train", "--config", "fashion_mnist", "data_kwargs.path={data}"),
                             "t10k-labels-idx1-ubyte[.gz] not found", fashion(missing="t10k-labels-idx1-ubyte")),
    # ---- label trees
    "label for a parameter that does not exist": Case(
        (*T, "--workdir", "{wd}"), "a label for ghost/kernel, which is not a parameter", patch=_patch_labels(_ghost)),
    "scale-variant leaf labelled scale-invariant": Case(
        (*T, "--workdir", "{wd}", "verify_labels=true"), "parameter bn_out/scale (group 'bn_out:scale') is labelled 'si' but the loss is not scale-invariant",
        patch=_patch_labels(_variant_as_si)),
    # ---- checkpoints and resumption
    "resume: the only checkpoint is corrupt": Case(R, "no valid checkpoint in {wd}/checkpoints: step_00000004: file",
                                                   only_checkpoint_corrupt),
    "resume with another config": Case((*R, "lr_w=0.2", "seed=4"),
                                       "the config differs from the one in checkpoint step_00000004 in "
                                       "lr_w (checkpoint 0.1, given 0.2); seed (checkpoint 3, given 4)", killed_run),
    "resume: checkpoints of a future format": Case(R, "MANIFEST.json has format 99", future_format),
    "resume: metrics.jsonl damaged mid-file": Case(R, "metrics.jsonl: line 2 is not a metrics record",
                                                   corrupt_metrics),
    "resume: only an incomplete save": Case(R, "holds no checkpoint (only the incomplete save", staging_only),
    "resume an empty directory": Case(R, "cannot resume: workdir {wd} holds no checkpoint", empty_dir),
    "resume a missing directory": Case(R, "cannot resume: workdir {wd} does not exist"),
    "resume a complete run": Case(R, "the run in {wd} is complete (summary.json exists)",
                                  lambda wd, finished: shutil.copytree(finished, wd)),
    "--resume without --workdir": Case(("train", "--config", "synthetic", "--resume"), "--resume needs --workdir"),
    "new run over checkpoints": Case((*T, "--workdir", "{wd}"), "already holds a run (checkpoints/)",
                                     checkpoints_only),
    "workdir is a file": Case((*T, "--workdir", "{wd}"), "exists and is not a directory", a_file),
    "workdir inside a file": Case((*T, "--workdir", "{wd}/run"), "cannot be created: {wd} is not a directory",
                                  a_file),
    # ---- command line
    "no command": Case((), "the following arguments are required: command"),
    "unknown command": Case(("fly",), "invalid choice: 'fly'"),
    "train without --config": Case(("train", "--workdir", "{wd}", *RUN), "the following arguments are required: --config"),
    "unknown option": Case((*T, "--bogus"), "unrecognized arguments: --bogus"),
    "an override given to `configs`": Case(("configs", "steps=3"), "unrecognized arguments: steps=3"),
    "override without a key": Case((*T, "=5"), "'=5' is not of the form key=value"),
    # ---- issue 16: integer ranges and sizes
    "seed of 2^32": Case((*T, "seed=4294967296"), "seed must be an integer in [0, 4294967295], got 4294967296"),
    "seed of 2^63": Case((*T, "seed=9223372036854775808"), "seed must be an integer in [0, 4294967295]"),
    "negative seed": Case((*T, "seed=-1"), "seed must be an integer in [0, 4294967295], got -1"),
    "steps of 2^31": Case((*T, "steps=2147483648"), "steps must be an integer in [1, 2147483647]"),
    "fractional steps": Case((*T, "steps=2.5"), "'steps': cannot parse '2.5' as an integer"),
    "negative batch size": Case((*T, "batch_size=-1"), "batch_size must be an integer >= 0, got -1"),
    "negative keep_checkpoints": Case((*T, "keep_checkpoints=-3"), "keep_checkpoints must be an integer >= 1"),
    "log_every text": Case((*T, "log_every=often"), "'log_every': cannot parse 'often' as an integer"),
    "lr_w given a boolean": Case((*T, "lr_w=true"), "'lr_w': cannot parse 'true' as a number"),
    "negative momentum": Case((*T, "momentum=-0.1"), "momentum must be in [0, 1), got -0.1"),
    "negative weight decay": Case((*T, "weight_decay=-0.001"), "weight_decay must be a finite number >= 0"),
    "infinite weight decay": Case((*T, "weight_decay=inf"), "weight_decay must be a finite number >= 0, got inf"),
    "bn for a preset without BN": Case((*T, "preset=no_bn", "bn=exact"), "preset 'no_bn' has no BatchNorm"),
    "arch_kwargs a list": Case((*T, "arch_kwargs=[1]"), "'arch_kwargs': cannot parse '[1]' as a Python dict"),
    "dict entry with a bare comma": Case((*T, "data_kwargs.path=a,b"), "cannot parse 'a,b' as a Python literal"),
    "deeply nested dict literal": Case((*T, "arch_kwargs=" + "{'a':" * 300 + "1" + "}" * 300),
                                       "'arch_kwargs': cannot parse"),
    "empty test split": Case((*T, "data_kwargs.n_test=0"), "n_test must be an integer >= 1, got 0"),
    "one class": Case((*T, "data_kwargs.num_classes=1"), "num_classes must be an integer >= 2, got 1"),
    "zero input dimension": Case((*T, "data_kwargs.dim=0"), "dim must be an integer >= 1, got 0"),
    "a model too large for memory": Case((*T, "arch_kwargs.widths=100000,100000"), "of memory;"),
    "data too large for memory": Case((*T, "data_kwargs.n_train=100000000000"), "synthetic data of 100000000032 x 6"),
    "inputs too wide for memory": Case((*T, "data_kwargs.dim=1000000000000"), "synthetic data of 96 x 1000000000000"),
    # ---- issue 16: the command line
    "--devices 0": Case((*T, "--devices", "0"), "--devices must be a positive integer, got 0"),
    "--devices 100000": Case((*T, "--devices", "100000"), "--devices=100000 is more than the 256"),
    "--devices 2^31": Case((*T, "--devices", "2147483648"), "--devices=2147483648 is more than the 256"),
    "--devices text": Case((*T, "--devices", "many"), "argument --devices: invalid int value: 'many'"),
    "--init-timeout text": Case((*T, "--init-timeout", "soon"), "argument --init-timeout: invalid int value"),
    "empty --workdir": Case((*T, "--workdir", ""), "--workdir must be a non-empty path"),
    # ---- issue 16: workdir paths
    "workdir a symlink loop": Case((*T, "--workdir", "{wd}"), "is a symbolic link loop", symlink_loop),
    "workdir a dangling symlink": Case((*T, "--workdir", "{wd}"), "is a dangling symbolic link", dangling_symlink),
    "workdir name over 255 bytes": Case((*T, "--workdir", "{wd}/" + "n" * 300), "is too long"),
    "workdir not UTF-8": Case((*T, "--workdir", "{wd}/\udcff"), "is not valid UTF-8"),
    "checkpoints is a file": Case((*T, "--workdir", "{wd}"), "checkpoints is not a directory",
                                  entry_of_the_wrong_kind("checkpoints", "file")),
    "metrics.jsonl is a directory": Case((*T, "--workdir", "{wd}"), "metrics.jsonl is not a regular file",
                                         entry_of_the_wrong_kind("metrics.jsonl", "dir")),
    "summary.json is a directory": Case((*T, "--workdir", "{wd}"), "summary.json is not a regular file",
                                        entry_of_the_wrong_kind("summary.json", "dir")),
    "resume: checkpoints is a file": Case(R, "checkpoints is not a directory",
                                          entry_of_the_wrong_kind("checkpoints", "file", resumable=True)),
    "resume: metrics.jsonl is a directory": Case(R, "metrics.jsonl is not a regular file",
                                                 entry_of_the_wrong_kind("metrics.jsonl", "dir", resumable=True)),
    "resume a symlink loop": Case(R, "is a symbolic link loop", symlink_loop),
    # ---- issue 16: hostile JSON, resume gaps, a second run
    "resume: manifests nested 100000 deep": Case(R, "nested deeper than 64 levels", deep_manifests),
    "resume: meta.json nested 100000 deep": Case(R, "nested deeper than 64 levels", deep_meta),
    "resume: a metrics line nested 100000 deep": Case(R, "metrics.jsonl: line 2 is not a metrics record",
                                                      deep_metrics_line),
    "resume: metrics.jsonl missing": Case(R, "cannot resume from step 4: {wd}/metrics.jsonl is missing",
                                          metrics_missing),
    "resume: metrics.jsonl without its first record": Case(R, "lacks the records of steps 0",
                                                           metrics_without_its_start),
    "resume: another run holds the workdir": Case(R, "is in use by another run (pid 4242)", held_lock(True)),
    "new run: another run holds the workdir": Case((*T, "--workdir", "{wd}"), "is in use by another run (pid 4242)",
                                                   held_lock(False)),
}


def snapshot(root) -> dict[str, str]:
    """Every file and directory under ``root``: path -> SHA-256 (or 'dir')."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):  # a loop or a dangling link: its target, not its content
                out[os.path.relpath(path, root)] = f"link -> {os.readlink(path)}"
                continue
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_the_table_is_large_enough():
    assert len(BAD) >= 59 + 40  # issue 6's 59 rows and issue 16's 40 or more


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, finished_run, tmp_path, monkeypatch, capsys):
    row = BAD[case]
    root = tmp_path / "root"
    (root / "cwd").mkdir(parents=True)
    monkeypatch.chdir(root / "cwd")  # where the default workdir runs/<config>-<timestamp> would go
    wd = root / "wd"
    if row.setup:
        row.setup(wd, finished_run)
    if row.patch:
        row.patch(monkeypatch)
    before = snapshot(root)
    fmt = {"{wd}": str(wd), "{data}": str(root / "data")}

    def fill(text: str) -> str:
        for k, v in fmt.items():
            text = text.replace(k, v)
        return text

    argv = [fill(a) for a in row.argv]
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == cli.EXIT_BAD_INPUT, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("rate-tuning: error: "), err
    assert "Traceback" not in err + out
    assert fill(row.expect) in lines[0], lines[0]
    assert snapshot(root) == before  # nothing written, changed or deleted


def test_an_os_error_while_running_is_exit_1_in_one_line(finished_run, tmp_path, monkeypatch, capsys):
    """Not bad input: a disk that fills up. One line, exit 1, the staging directory removed (a real full
    disk: tests/test_reliability.py)."""
    def full_disk(staging, step):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "seal", full_disk)
    rc = cli.main(["train", "--config", "synthetic", "--workdir", str(tmp_path / "wd"), "--quiet", *RUN])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == cli.EXIT_OS_ERROR and len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("rate-tuning: error: could not write checkpoint step_00000000 in ")
    assert err[0].endswith(": No space left on device")
    assert os.listdir(tmp_path / "wd" / "checkpoints") == []


# ------------------------------------------------------------------------------------------------
# Property-based tests of config parsing


FIELDS = configs.field_types()
BASE = configs.get("synthetic")


def fields_of(base_type) -> list[str]:
    return [k for k, t in FIELDS.items() if configs._base(t) is base_type]


INT_FIELDS, FLOAT_FIELDS, BOOL_FIELDS = fields_of(int), fields_of(float), fields_of(bool)
STR_FIELDS, DICT_FIELDS = fields_of(str), fields_of(dict)
OPTIONAL = [k for k, t in FIELDS.items() if configs._optional(t)]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_every_field_type_is_covered():
    assert set(INT_FIELDS + FLOAT_FIELDS + BOOL_FIELDS + STR_FIELDS + DICT_FIELDS) == set(FIELDS)
    assert {"checkpoint_every", "keep_checkpoints"} <= set(INT_FIELDS)


@SETTINGS
@given(key=st.sampled_from(INT_FIELDS), value=st.integers(-10**30, 10**30), underscores=st.booleans())
def test_integers_round_trip(key, value, underscores):
    text = f"{value:_}" if underscores else str(value)
    got = getattr(configs.override(BASE, [f"{key}={text}"]), key)
    assert got == value and type(got) is int


@SETTINGS
@given(key=st.sampled_from(FLOAT_FIELDS), value=st.floats(allow_nan=True, allow_infinity=True))
def test_floats_round_trip(key, value):
    got = getattr(configs.override(BASE, [f"{key}={value!r}"]), key)
    assert type(got) is float and (got == value or (math.isnan(got) and math.isnan(value)))


@SETTINGS
@given(key=st.sampled_from(OPTIONAL), word=st.sampled_from(["None", "none", "null", "NULL", " none "]))
def test_optional_fields_take_none(key, word):
    assert getattr(configs.override(BASE, [f"{key}={word}"]), key) is None


@SETTINGS
@given(key=st.sampled_from(BOOL_FIELDS), word=st.sampled_from(["true", "yes", "1", "false", "no", "0"]),
       upper=st.lists(st.booleans(), min_size=5, max_size=5))
def test_booleans_round_trip(key, word, upper):
    text = "".join(c.upper() if u else c for c, u in zip(word, upper))
    assert getattr(configs.override(BASE, [f"{key}={text}"]), key) is (word in ("true", "yes", "1"))


def _plain_text(s: str) -> bool:
    return s == s.strip() and s.lower() not in ("none", "null") and not (
        len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"")


@SETTINGS
@given(key=st.sampled_from(STR_FIELDS), value=st.text(min_size=1).filter(_plain_text))
def test_strings_round_trip(key, value):
    assert getattr(configs.override(BASE, [f"{key}={value}"]), key) == value


LITERALS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(string.printable),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner), max_leaves=6)
IDENTIFIERS = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)


@SETTINGS
@given(key=st.sampled_from(DICT_FIELDS), value=st.dictionaries(IDENTIFIERS, LITERALS, max_size=4))
def test_dicts_round_trip(key, value):
    assert getattr(configs.override(BASE, [f"{key}={value!r}"]), key) == value


@SETTINGS
@given(key=st.sampled_from(DICT_FIELDS), entry=IDENTIFIERS, value=LITERALS)
def test_dotted_entries_round_trip(key, entry, value):
    got = getattr(configs.override(BASE, [f"{key}.{entry}={value!r}"]), key)
    assert got == {**getattr(BASE, key), entry: value}


@SETTINGS
@given(key=st.text().filter(lambda k: "=" not in k and k.strip().partition(".")[0] not in FIELDS), value=st.text())
def test_an_unknown_key_is_a_config_error(key, value):
    with pytest.raises(ConfigError, match="unknown config key|not of the form key=value"):
        configs.override(BASE, [f"{key}={value}"])


@SETTINGS
@given(assignment=st.text())
def test_any_assignment_gives_a_config_or_a_config_error(assignment):
    try:
        config = configs.override(BASE, [assignment])
    except ConfigError as e:
        assert "\n" not in str(e) or "\n" in assignment  # the message quotes the input, and nothing more
        return
    assert isinstance(config, Config)


@SETTINGS
@given(key=st.sampled_from(sorted(FIELDS)), text=st.text(max_size=30)
       | st.sampled_from(["0", "-1", "1e400", "nan", "inf", "True", "None", "{}", "[]", "(", "1_0", "٣"]))
def test_any_value_is_parsed_and_validated_or_a_config_error(key, text):
    """parse_value and validate_config raise ConfigError and nothing else, whatever the text."""
    try:
        config = configs.override(BASE, [f"{key}={text}"])
        configs.validate(config)
    except ConfigError:
        return


def test_parse_value_rejects_with_config_error_for_every_type():
    for key, tp in FIELDS.items():
        if configs._base(tp) is str:
            continue  # any text is a string
        with pytest.raises(ConfigError, match=f"config key '{key}': cannot parse"):
            configs.parse_value(key, tp, "(((")
    assert typing.get_type_hints(Config) == FIELDS
