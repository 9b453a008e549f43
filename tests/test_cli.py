"""Tests of the ``rate-tuning`` command and of config parsing (rate_tuning.cli, rate_tuning.configs)."""
from __future__ import annotations

import json
import os
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


def _train(tmp_path, name, *extra):
    proc = subprocess.run([sys.executable, "-m", "rate_tuning.cli", "train", "--config", "digits", "steps=12",
                           "log_every=4", "dtype=float64", "--quiet", "--workdir", str(tmp_path / name), *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return proc


def test_data_parallel_run_is_the_one_device_run_to_round_off(tmp_path):
    """--devices 2 (2 virtual CPU devices): batch sharded, BN statistics over the global batch. In float64
    the metrics stream and the summary equal the one-device run's to 1e-12 relative (the same sums split in
    two and all-reduced: round-off of ~100-term sums, ~1e-14, over 12 steps of a well-conditioned MLP)."""
    one, two = _train(tmp_path, "one"), _train(tmp_path, "two", "--devices", "2")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "two")]
    assert summaries[0]["data_parallel_devices"] == 1 and summaries[1]["data_parallel_devices"] == 2
    assert summaries[1]["device_count"] == 2
    streams = [[json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
               for n in ("one", "two")]
    assert [(r["step"], r["split"]) for r in streams[0]] == [(r["step"], r["split"]) for r in streams[1]]
    for a, b in zip(*streams):
        for key, value in a.items():
            if isinstance(value, float) and key != "lemma24_residual":  # itself round-off
                assert b[key] == pytest.approx(value, rel=1e-12, abs=1e-300), key
    for key in ("final_train_loss", "test_loss", "train_eval_loss"):
        assert summaries[1][key] == pytest.approx(summaries[0][key], rel=1e-12)


@pytest.mark.parametrize("devices,message", [("3", "not divisible by the 3 devices"),
                                             ("0", "--devices must be a positive integer")])
def test_bad_device_count_is_one_line_exit_2_and_writes_nothing(tmp_path, devices, message):
    proc = _train(tmp_path, "bad", "--devices", devices)  # digits: batch 128
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "bad").exists()
