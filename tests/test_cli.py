"""Tests of the ``rate-tuning`` command and of config parsing (rate_tuning.cli, rate_tuning.configs)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from rate_tuning import cli, configs, models
from rate_tuning.configs import Config, ConfigError

# ------------------------------------------------------------------------------------------------
# configs: get, available, override


def test_every_config_loads_and_is_described():
    names = configs.available()
    assert {"digits", "digits_gd", "fashion_mnist", "synthetic"} <= set(names)
    for name, description in names.items():
        assert isinstance(configs.get(name), Config) and description, name
    assert configs.get("digits_gd").batch_size == 0  # full-batch GD


def test_get_unknown_config_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown config 'nope'.*digits.*synthetic"):
        configs.get("nope")


@pytest.mark.parametrize("assignment, field, value", [
    ("steps=250", "steps", 250),
    ("steps=1e3", "steps", 1000),
    ("lr_w=1e-3", "lr_w", 1e-3),
    ("lr_w=100", "lr_w", 100.0),
    ("project=true", "project", True),
    ("project=No", "project", False),
    ("momentum=0.9", "momentum", 0.9),
    ("momentum=None", "momentum", None),
    ("bn=standard", "bn", "standard"),
    ("bn=null", "bn", None),
    ("dataset='digits'", "dataset", "digits"),
    ("arch_kwargs.widths=(32,32)", "arch_kwargs", {"widths": (32, 32)}),
    ("arch_kwargs.widths=32,32", "arch_kwargs", {"widths": (32, 32)}),
    ("arch_kwargs={'widths': [4]}", "arch_kwargs", {"widths": [4]}),
    ("data_kwargs.path=/data/fashion-mnist", "data_kwargs", {"n_train": 256, "n_test": 128, "dim": 16,
                                                             "num_classes": 4, "seed": 0,
                                                             "path": "/data/fashion-mnist"}),
])
def test_override_parses_by_field_type(assignment, field, value):
    config = configs.override(configs.get("synthetic"), [assignment])
    got = getattr(config, field)
    assert got == value and type(got) is type(value), (got, value)


def test_override_leaves_the_original_untouched_and_applies_in_order():
    base = configs.get("synthetic")
    new = configs.override(base, ["arch_kwargs.widths=(4,)", "steps=3", "steps=5"])
    assert new.steps == 5 and new.arch_kwargs == {"widths": (4,)}
    assert base.arch_kwargs == {"widths": (16,)} and base.steps == 60


@pytest.mark.parametrize("assignment, match", [
    ("bogus=1", "unknown config key 'bogus'"),
    ("steps", "not of the form key=value"),
    ("=3", "not of the form key=value"),
    ("steps=abc", "'steps': cannot parse 'abc' as an integer"),
    ("steps=2.5", "'steps'"),
    ("steps=True", "'steps'"),
    ("lr_w=fast", "'lr_w': cannot parse 'fast' as a number"),
    ("project=maybe", "'project'"),
    ("arch_kwargs.widths=(64,64", "'arch_kwargs.widths'"),
    ("arch_kwargs=[1]", "'arch_kwargs'"),
    ("lr_w.x=1", "dotted entry"),
])
def test_override_rejects(assignment, match):
    with pytest.raises(ConfigError, match=match):
        configs.override(configs.get("synthetic"), [assignment])


# ------------------------------------------------------------------------------------------------
# Bad input through the command line: exit 2, one line on stderr, nothing written


def _write_idx(path, magic: int, dims: tuple[int, ...], truncate: int = 0):
    body = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    n = 1
    for d in dims:
        n *= d
    with open(path, "wb") as f:
        f.write((body + bytes(n))[:len(body) + n - truncate])


@pytest.fixture(scope="module")
def bad_fashion_dir(tmp_path_factory):
    """Four Fashion-MNIST IDX files, the train images truncated by 100 bytes."""
    d = tmp_path_factory.mktemp("fashion")
    for prefix, n in (("train", 20), ("t10k", 10)):
        _write_idx(d / f"{prefix}-images-idx3-ubyte", 0x803, (n, 28, 28), truncate=100 if prefix == "train" else 0)
        _write_idx(d / f"{prefix}-labels-idx1-ubyte", 0x801, (n,))
    return str(d)


BAD_INPUTS = {
    "zero lr": ["--config", "synthetic", "lr_w=0"],
    "negative lr": ["--config", "synthetic", "lr_w=-1"],
    "nan lr": ["--config", "synthetic", "lr_w=nan"],
    "inf lr": ["--config", "synthetic", "lr_g=inf"],
    "unknown config": ["--config", "nope"],
    "unknown key": ["--config", "synthetic", "learning_rate=0.1"],
    "unparsable value": ["--config", "synthetic", "steps=ten"],
    "malformed literal": ["--config", "synthetic", "arch_kwargs.widths=(8,"],
    "no config": [],
    "bad schedule": ["--config", "synthetic", "schedule=cosine"],
    "batch too large": ["--config", "synthetic", "batch_size=100000"],
    "unknown arch kwarg": ["--config", "synthetic", "arch_kwargs.depth=3"],
    "library ValueError": ["--config", "synthetic", "data_kwargs.noise=-1"],
    "missing dataset dir": ["--config", "fashion_mnist", "data_kwargs.path={missing}"],
    "truncated IDX file": ["--config", "fashion_mnist", "data_kwargs.path={fashion}"],
    "label not scale-invariant": ["--config", "synthetic", "dtype=float64", "bn=standard", "verify_labels=true"],
}


def _assert_one_error_line(rc: int, err: str, expect: str | None = None):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rate-tuning: error: "), err
    assert "Traceback" not in err
    if expect:
        assert expect in lines[0], lines[0]


EXPECTED = {
    "zero lr": "lr_w must be a positive finite number", "nan lr": "got nan", "inf lr": "lr_g",
    "unknown config": "unknown config 'nope'", "unknown key": "unknown config key 'learning_rate'",
    "unparsable value": "cannot parse 'ten'", "no config": "--config", "batch too large": "batch_size",
    "library ValueError": "noise", "missing dataset dir": "not found", "truncated IDX file": "truncated",
    "label not scale-invariant": "not scale-invariant",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_fashion_dir, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)  # the default workdir runs/<config>-<timestamp> would be created here
    argv = [a.format(missing=str(tmp_path / "missing"), fashion=bad_fashion_dir) for a in BAD_INPUTS[case]]
    rc = cli.main(["train", *argv])
    out, err = capsys.readouterr()
    _assert_one_error_line(rc, err, EXPECTED.get(case))
    assert os.listdir(run_dir) == []


def test_label_mismatch_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    real = models.BNNet.labels

    def missing_layer(self, grouping="layer"):
        tree = real(self, grouping)
        del tree["layer0"]
        return tree

    monkeypatch.setattr(models.BNNet, "labels", missing_layer)
    rc = cli.main(["train", "--config", "synthetic", "--workdir", str(tmp_path / "run")])
    _assert_one_error_line(rc, capsys.readouterr().err, "no label for parameter layer0/kernel")
    assert not (tmp_path / "run").exists()


def test_bad_input_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rate_tuning.cli", "train", "--config", "synthetic", "lr_w=-0.1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    _assert_one_error_line(proc.returncode, proc.stderr, "lr_w must be a positive finite number, got -0.1")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Good input


def test_configs_command_lists_configs(capsys):
    assert cli.main(["configs"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "digits_gd", "fashion_mnist", "synthetic"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name


def test_train_synthetic_end_to_end_into_the_default_workdir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rate_tuning.cli", "train", "--config", "synthetic",
                           "steps=40", "log_every=10"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "step 10  loss" in proc.stdout and "eval step 30" in proc.stdout
    (run,) = os.listdir(tmp_path / "runs")  # runs/<config>-<timestamp>
    assert run.startswith("synthetic-")
    workdir = tmp_path / "runs" / run
    assert set(os.listdir(workdir)) == {"metrics.jsonl", "summary.json", "checkpoints"}
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [
        (0, "train"), (10, "train"), (20, "train"), (30, "test"), (30, "train"), (39, "train"), (40, "test")]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["config"]["steps"] == 40 and summary["steps"] == 40
    assert summary["test_accuracy"] == records[-1]["accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert summary["backend"] and summary["jax"] and summary["wall_time_s"] > 0


RUN_ARGS = ["--config", "digits", "steps=12", "log_every=4", "checkpoint_every=4", "dtype=float64"]
"""The runs of the data-parallel and multi-process tests: 12 SGD steps of the digits MLP in float64."""

REL_ROUND_OFF = 1e-12
"""A data-parallel run is the one-device run with the batch sums split and all-reduced: round-off of
~100-term float64 sums (~1e-14 relative) carried over 12 steps of a well-conditioned MLP stays < 1e-12."""


def _train(tmp_path, name, *extra):
    proc = subprocess.run([sys.executable, "-m", "rate_tuning.cli", "train", *RUN_ARGS, "--quiet",
                           "--workdir", str(tmp_path / name), *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return proc


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """The reference run: one process, one device."""
    d = tmp_path_factory.mktemp("one_device")
    proc = _train(d, "one")
    assert proc.returncode == 0, proc.stderr
    return d / "one"


def _stream(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run_to_round_off(reference, other) -> None:
    """The metrics streams (same records, every number) and the summaries agree to REL_ROUND_OFF."""
    streams = [_stream(reference), _stream(other)]
    assert [(r["step"], r["split"]) for r in streams[0]] == [(r["step"], r["split"]) for r in streams[1]]
    for a, b in zip(*streams):
        for key, value in a.items():
            if isinstance(value, float) and key != "lemma24_residual":  # itself round-off
                assert b[key] == pytest.approx(value, rel=REL_ROUND_OFF, abs=1e-300), key
    summaries = [json.loads((w / "summary.json").read_text()) for w in (reference, other)]
    for key in ("final_train_loss", "test_loss", "train_eval_loss"):
        assert summaries[1][key] == pytest.approx(summaries[0][key], rel=REL_ROUND_OFF)
    for group, norm in summaries[0]["norms"].items():
        assert summaries[1]["norms"][group] == pytest.approx(norm, rel=REL_ROUND_OFF), group


@pytest.mark.slow
def test_data_parallel_run_is_the_one_device_run_to_round_off(tmp_path, one_device_run):
    """--devices 2 (2 virtual CPU devices): batch sharded, BN statistics over the global batch."""
    two = _train(tmp_path, "two", "--devices", "2")
    assert two.returncode == 0, two.stderr
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["data_parallel_devices"] == 2 and summary["device_count"] == 2 and summary["processes"] == 1
    assert json.loads((one_device_run / "summary.json").read_text())["data_parallel_devices"] == 1
    _assert_same_run_to_round_off(one_device_run, tmp_path / "two")


@pytest.mark.parametrize("devices,message", [("3", "not divisible by the 3 devices"),
                                             ("0", "--devices must be a positive integer")])
def test_bad_device_count_is_one_line_exit_2_and_writes_nothing(tmp_path, devices, message):
    proc = _train(tmp_path, "bad", "--devices", devices)  # digits: batch 128
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------
# Several processes (jax.distributed on 127.0.0.1, one CPU device each).


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_processes(tmp_path, workdirs, *extra, timeout: int = 120) -> list[subprocess.CompletedProcess]:
    """``rate-tuning train`` as process i of ``len(workdirs)`` with ``--workdir workdirs[i]``, all at once."""
    port, n = _free_port(), len(workdirs)
    procs = [subprocess.Popen([sys.executable, "-m", "rate_tuning.cli", "train", *RUN_ARGS, "--quiet",
                               "--workdir", str(tmp_path / w), "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", str(n), "--process-id", str(i), "--init-timeout", "60", *extra],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, w in enumerate(workdirs)]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return done


def _errors(stderr: str) -> list[str]:
    """The ``rate-tuning:`` lines of ``stderr`` (JAX's own C++ logging of the distributed runtime aside)."""
    return [line for line in stderr.splitlines() if line.startswith("rate-tuning:")]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """2 processes: process 0 writes ``dist``, process 1 is given ``p1`` (and must write nothing)."""
    d = tmp_path_factory.mktemp("two_process")
    procs = _train_processes(d, ["dist", "p1"])
    for i, p in enumerate(procs):
        assert p.returncode == 0, (i, p.stderr[-3000:])
    return d


@pytest.mark.slow
def test_two_process_run_is_the_one_device_run_and_only_process_0_writes(two_process_run, one_device_run):
    summary = json.loads((two_process_run / "dist" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["data_parallel_devices"] == 2 and summary["device_count"] == 2
    assert not (two_process_run / "p1").exists()
    _assert_same_run_to_round_off(one_device_run, two_process_run / "dist")
    assert sorted(os.listdir(two_process_run / "dist" / "checkpoints")) == sorted(
        os.listdir(one_device_run / "checkpoints"))


@pytest.mark.slow
def test_two_process_resume_continues_from_process_0s_checkpoint(tmp_path, two_process_run, one_device_run):
    """Process 0 reads the step-8 checkpoint and passes it to process 1; the resumed run ends where the
    uninterrupted one-device run does (to round-off)."""
    run = tmp_path / "dist"
    shutil.copytree(two_process_run / "dist", run)
    shutil.rmtree(run / "checkpoints" / "step_00000012")
    os.remove(run / "summary.json")
    procs = _train_processes(tmp_path, ["dist", "p1"], "--resume")
    for i, p in enumerate(procs):
        assert p.returncode == 0, (i, p.stderr[-3000:])
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 8
    assert not (tmp_path / "p1").exists()  # process 1 read nothing from there: it has no run to resume
    _assert_same_run_to_round_off(one_device_run, run)


@pytest.mark.slow
def test_a_bad_input_in_process_0_stops_every_process_before_anything_is_written(tmp_path, two_process_run):
    run = tmp_path / "dist"
    shutil.copytree(two_process_run / "dist", run)  # a finished run: not a new workdir
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    procs = _train_processes(tmp_path, ["dist", "p1"])
    assert [p.returncode for p in procs] == [2, 2]
    (own,), (told,) = _errors(procs[0].stderr), _errors(procs[1].stderr)
    assert "already holds a run" in own
    assert told.startswith("rate-tuning: error: process 0 of 2 stopped: workdir") and "already holds a run" in told
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_incomplete_process_options_are_one_line_exit_2():
    for argv in (["--coordinator", "127.0.0.1:1234"], ["--num-processes", "2", "--process-id", "0"]):
        proc = subprocess.run([sys.executable, "-m", "rate_tuning.cli", "train", *RUN_ARGS, *argv],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "need all of --coordinator, --num-processes and --process-id" in proc.stderr


def test_no_coordinator_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rate_tuning.cli", "train", *RUN_ARGS, "--workdir", str(tmp_path / "x"),
                           "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--process-id", "1",
                           "--init-timeout", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no coordinator at 127.0.0.1:" in proc.stderr, proc.stderr
    assert len(_errors(proc.stderr)) == 1 and not (tmp_path / "x").exists()
