"""Exact resumption, the metrics stream after a kill, and divergence (issue 6).

* Subprocesses SIGKILLed at 5 random steps (fixed seed: 4 kills injected at random phases, one sent from
  outside at a random moment), each resumed with ``--resume``: the final parameters, optimizer state and
  BatchNorm statistics are bitwise those of an uninterrupted run at a fixed thread count
  (``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``), and ``metrics.jsonl`` is byte-identical.
* In-process: interruption and resumption, a corrupt newest checkpoint, a run killed after its final
  checkpoint; ``read_metrics`` on a truncated stream.
* Divergence: a scale-variant ``lr_g`` too large stops the run (exit 3, the step and the groups named, the
  last good checkpoint kept); a huge ``lr_w`` does not (the paper's point).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from rate_tuning import checkpoint as ckpt
from rate_tuning import cli, configs, rundir, steps, train
from tests import crash

TINY = ["data_kwargs.n_train=64", "data_kwargs.n_test=32", "data_kwargs.dim=6", "data_kwargs.num_classes=3",
        "data_kwargs.seed=1", "arch_kwargs.widths=8,8", "batch_size=16", "seed=3", "dtype=float64",
        "log_every=1", "eval_every=4", "checkpoint_every=3", "keep_checkpoints=2"]
"""A tiny 'paper'-preset MLP (scale-invariant and scale-variant groups, BN statistics) in float64."""

PINNED_THREADS = "--xla_cpu_multi_thread_eigen=false"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("compilation_cache")


def tiny_config(*extra: str) -> configs.Config:
    return configs.override(configs.get("synthetic"), [*TINY, *extra])


def final_state(workdir) -> dict:
    """The arrays of the newest checkpoint (the final one after a complete run), float64 kept."""
    found = ckpt.latest_valid(os.path.join(str(workdir), rundir.CHECKPOINTS_DIR))
    with jax.enable_x64(True):
        return found.step, jax.device_get(ckpt.restore(found.path))


def assert_bitwise(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def assert_same_run(ref_dir, run_dir):
    (s1, a), (s2, b) = final_state(ref_dir), final_state(run_dir)
    assert s1 == s2
    assert a["params"]["layer0"]["kernel"].dtype == np.float64
    assert_bitwise(a, b)  # params, batch_stats, opt_state, step, rng
    assert (run_dir / "metrics.jsonl").read_bytes() == (ref_dir / "metrics.jsonl").read_bytes()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref_dir, run_dir))
    for key in ("final_train_loss", "test_loss", "test_accuracy", "train_eval_loss", "effective_lr", "norms"):
        assert sa[key] == sb[key], key


# ------------------------------------------------------------------------------------------------
# Subprocesses killed with SIGKILL


def _cli(workdir, overrides, *, kill_at=None, resume=False, cache=None, **popen):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {PINNED_THREADS}".strip()
    if cache:  # jax's persistent compilation cache: the same HLO gives the same executable, only faster
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    entry = ["-m", "tests.crash", kill_at] if kill_at else ["-m", "rate_tuning.cli"]
    argv = [sys.executable, *entry, "train", "--config", "synthetic", "--workdir", str(workdir),
            *(["--resume"] if resume else []), *overrides]
    return subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def kill_plan(seed: int, steps: int, every: int) -> list[str]:
    """4 injected kills at increasing random steps, each at a random phase (``phase:step``, see
    :mod:`tests.crash`); 'checkpoint' and 'prune' move to the next checkpoint step."""
    rng = random.Random(seed)
    while True:
        points = sorted(rng.sample(range(1, steps - 2 * every - 2), 4))
        phases = rng.sample(["step", "metrics", "checkpoint", "prune"], 4)
        plan = [(-(-k // every) * every if p in ("checkpoint", "prune") else k, p) for k, p in zip(points, phases)]
        if all(a[0] < b[0] for a, b in zip(plan, plan[1:])) and plan[-1][0] < steps - 2 * every - 1:
            return [f"{p}:{k}" for k, p in plan]


@pytest.mark.slow
def test_killed_at_five_random_steps_and_resumed_ends_bitwise_equal(tmp_path):
    steps, every = 30, 5
    overrides = [*TINY, f"steps={steps}", f"checkpoint_every={every}"]
    plan = kill_plan(seed=2019, steps=steps, every=every)
    ref_dir, run_dir, cache = tmp_path / "reference", tmp_path / "killed", tmp_path / "jax-cache"
    reference = _cli(ref_dir, overrides)  # runs beside the chain (2 cores)
    notices = []
    for i, kill_at in enumerate(plan):
        proc = _cli(run_dir, overrides, kill_at=kill_at, resume=i > 0, cache=cache)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, err)
        assert "Traceback" not in err, err
        notices += [line for line in err.splitlines() if "warning" in line]
        if kill_at.startswith("metrics"):  # half a record was written: the last line is truncated
            assert not (run_dir / "metrics.jsonl").read_bytes().endswith(b"\n")
        if kill_at.startswith("checkpoint"):  # killed before the seal: the checkpoint does not count
            assert int(kill_at.split(":")[1]) not in ckpt.list_steps(str(run_dir / "checkpoints"))

    # the fifth kill comes from outside, at whatever the process is doing after it reports step k
    k = random.Random(5).randint(int(plan[-1].split(":")[1]) + 1, steps - 2 * every)
    proc = _cli(run_dir, overrides, resume=True, cache=cache)
    for line in proc.stdout:
        if line.startswith(f"step {k} "):
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill at step {k}"

    proc = _cli(run_dir, overrides, resume=True, cache=cache)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resuming" in out and "Traceback" not in err
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err

    if any(p.startswith("metrics") for p in plan):
        assert any("removed a truncated last line" in n for n in notices + err.splitlines())
    assert_same_run(ref_dir, run_dir)
    assert ckpt.list_steps(str(run_dir / "checkpoints")) == [steps - every, steps]  # keep_checkpoints=2
    assert ckpt.leftovers(str(run_dir / "checkpoints")) == []


# ------------------------------------------------------------------------------------------------
# In-process: interrupt, resume, corrupt checkpoints


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run in this process."""
    workdir = tmp_path_factory.mktemp("ref") / "run"
    train.train_and_evaluate(tiny_config("steps=12"), str(workdir), verbose=False)
    return workdir


def interrupt() -> None:
    raise KeyboardInterrupt


def _interrupt(monkeypatch, workdir, kill_at: str, resume: bool = False):
    """Run until ``kill_at`` (:mod:`tests.crash`), where a subprocess would SIGKILL itself; here the
    KeyboardInterrupt raised instead unwinds without writing anything more."""
    with monkeypatch.context() as m:
        crash.install(kill_at, setattr=m.setattr, die=interrupt)
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(tiny_config("steps=12"), str(workdir), verbose=False, resume=resume)


def test_interrupted_twice_with_a_corrupt_checkpoint_and_resumed_in_process(reference, tmp_path, monkeypatch,
                                                                           capsys):
    run = tmp_path / "run"
    _interrupt(monkeypatch, run, "metrics:7")  # half of the record of step 7 is written
    seen = []
    records = rundir.read_metrics(str(run / "metrics.jsonl"), warn=seen.append)
    assert records[-1]["step"] == 6 and len(seen) == 1 and "skipped a truncated last line" in seen[0]
    capsys.readouterr()

    _interrupt(monkeypatch, run, "step:10", resume=True)  # resumed from step 6; checkpoints 6 and 9 now
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "removed a truncated last line" in err[0]  # one line, and only that

    newest = run / "checkpoints" / "step_00000009"
    data = max((p for p in newest.rglob("*") if p.is_file() and "state" in p.parts), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:-7])  # truncated
    summary = train.train_and_evaluate(tiny_config("steps=12"), str(run), verbose=False, resume=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rate-tuning: warning: checkpoint step_00000009 is corrupt (file state/")
    assert "truncated" in err[0] and err[0].endswith("falling back to step_00000006")
    assert summary["resumed_from_step"] == 6
    assert_same_run(reference, run)  # same process, same threads: bitwise
    assert any(p.name.startswith("step_00000009.corrupt-") for p in (run / "checkpoints").iterdir())  # kept


def test_killed_after_the_final_checkpoint_resumes_to_the_same_summary(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()  # killed between the final checkpoint and the summary
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 12, "split": "te')  # and mid-way through some line
    summary = train.train_and_evaluate(tiny_config("steps=12"), str(run), verbose=False, resume=True)
    assert summary["resumed_from_step"] == 12 and summary["checkpoint"] == "checkpoints/step_00000012"
    assert_same_run(reference, run)


@pytest.mark.slow
def test_momentum_weight_decay_and_schedule_state_resume_exactly_in_float32(tmp_path, monkeypatch):
    """The optimizer state that matters: a momentum trace, a schedule's step count, per-channel groups."""
    extra = ("steps=8", "dtype=float32", "momentum=0.9", "weight_decay=1e-4", "schedule=inverse_sqrt",
             "grouping=channel", "eval_every=0")
    config = tiny_config(*extra)
    train.train_and_evaluate(config, str(tmp_path / "ref"), verbose=False)

    with monkeypatch.context() as m:
        crash.install("step:5", setattr=m.setattr, die=interrupt)
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, str(tmp_path / "run"), verbose=False)
    assert train.train_and_evaluate(config, str(tmp_path / "run"), verbose=False, resume=True)["resumed_from_step"] == 3
    (_, a), (_, b) = final_state(tmp_path / "ref"), final_state(tmp_path / "run")
    assert a["params"]["layer0"]["kernel"].dtype == np.float32
    assert_bitwise(a, b)
    assert (tmp_path / "ref" / "metrics.jsonl").read_bytes() == (tmp_path / "run" / "metrics.jsonl").read_bytes()


def test_read_metrics_skips_only_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 0, "split": "train", "loss": 1.0}, {"step": 1, "split": "train", "loss": None}]
    text = "".join(json.dumps(r) + "\n" for r in good)
    path.write_text(text + '{"step": 2, "spl')
    seen = []
    assert rundir.read_metrics(str(path), warn=seen.append) == good
    assert len(seen) == 1 and "skipped a truncated last line" in seen[0] and "line 3" in seen[0]
    path.write_text(text + json.dumps({"step": 2}))  # complete record, killed before its newline
    assert rundir.read_metrics(str(path), warn=pytest.fail)[-1] == {"step": 2}
    path.write_text('{"step": 0}\n{"ste\n{"step": 2}\n')  # damage in the middle is not a kill: an error
    with pytest.raises(rundir.MetricsError, match="line 2 is not a metrics record"):
        rundir.read_metrics(str(path))


# ------------------------------------------------------------------------------------------------
# Divergence


def _cli_in_process(workdir, *overrides):
    return cli.main(["train", "--config", "synthetic", "--workdir", str(workdir), "--quiet", *TINY, "steps=10",
                     "eval_every=0", "keep_checkpoints=3", *overrides])


def test_too_large_lr_g_diverges_exit_3_naming_the_step_and_groups(tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli_in_process(run, "lr_g=1e100", "checkpoint_every=1") == cli.EXIT_DIVERGED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("rate-tuning: error: diverged at step 2: non-finite loss and gradient in 7 groups: "
                             "'bn_out/bias' (scale-variant, lr_g=1e+100), 'bn_out/scale' (scale-variant, "
                             "lr_g=1e+100), 'bn0:affine' (scale-invariant, lr_w=0.1) and 4 more")
    assert err[0].endswith("the last good checkpoint checkpoints/step_00000002 is kept")
    # metrics up to and including the bad step, no summary, the checkpoints before it, all finite
    records = rundir.read_metrics(str(run / "metrics.jsonl"), warn=pytest.fail)
    assert [r["step"] for r in records] == [0, 1, 2] and records[-1]["loss"] is None
    assert records[1]["loss"] > 1e90  # the scale-variant output layer blew up first
    assert not (run / "summary.json").exists()
    assert ckpt.list_steps(str(run / "checkpoints")) == [0, 1, 2]
    step, state = final_state(run)
    assert step == 2 and all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))


def test_huge_lr_w_does_not_diverge_but_the_same_lr_g_blows_up(tmp_path, capsys):
    """Scale-invariant groups auto-tune their effective rate lr_w/||w||^2 (the paper's point), so lr_w=1e10
    trains; the same rate on the scale-variant groups makes the loss ~1e9 (and 1e100 overflows, above)."""
    assert _cli_in_process(tmp_path / "w", "lr_w=1e10", "checkpoint_every=0") == 0
    assert _cli_in_process(tmp_path / "g", "lr_g=1e10", "checkpoint_every=0") == 0
    assert capsys.readouterr().err == ""
    sw, sg = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("w", "g"))
    assert sw["final_train_loss"] < 2 and sw["test_loss"] < 2  # O(1): 3 classes, log 3 = 1.1 at chance
    assert sw["effective_lr_max"] < 1e-3  # lr_w / ||w||^2: the first step grew the norms and tamed the rate
    assert sg["final_train_loss"] > 1e6


def test_divergence_message_names_the_first_cause():
    groups = [("bn0:affine", "si"), ("bn_out/scale", "variant"), ("classifier/kernel", "frozen")]
    ok = np.ones(1 + 2 * len(groups), bool)
    param_bad = ok.copy()
    param_bad[1 + 3 + 0] = False  # parameter of bn0:affine after the update
    msg, named = steps.divergence_message(41, param_bad, groups, 0.5, 2.0, None)
    assert msg == ("diverged at step 41: non-finite parameter after the update in group 'bn0:affine' "
                   "(scale-invariant, lr_w=0.5); no checkpoint was written") and named == ["bn0:affine"]
    grad_bad = ok.copy()
    grad_bad[[2, 4 + 1]] = False  # gradient of bn_out/scale (and hence its parameter)
    msg, named = steps.divergence_message(7, grad_bad, groups, 0.5, 2.0, "checkpoints/step_00000005")
    assert msg == ("diverged at step 7: non-finite gradient in group 'bn_out/scale' (scale-variant, lr_g=2); "
                   "the last good checkpoint checkpoints/step_00000005 is kept") and named == ["bn_out/scale"]


def test_finite_flags_inside_jit():
    from rate_tuning import groups as G

    labels = {"w": G.si("w"), "b": G.VARIANT_LABEL}
    params = {"w": np.ones(3), "b": np.asarray([1.0, np.inf])}
    flags = jax.jit(lambda l, g, p: steps.finite_flags(l, g, p, labels))(np.float32(np.nan), params, params)
    assert steps.finite_groups(params, labels) == [("b", "variant"), ("w", "si")]  # tree order
    np.testing.assert_array_equal(flags, [False, False, True, False, True])
