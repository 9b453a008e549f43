"""Tests of rate_tuning.train: the jitted steps and their metrics, the loops, the outputs, validation."""
from __future__ import annotations

import dataclasses
import json

import chex
import jax
import numpy as np
import pytest

from rate_tuning import data, models, steps, train
from rate_tuning import record as R
from rate_tuning import groups as G
from rate_tuning.configs import Config, ConfigError

EPS64 = float(np.finfo(np.float64).eps)


def tiny(**kw) -> Config:
    """A tiny fully scale-invariant MLP on a seeded Gaussian mixture, float64."""
    base = Config(dataset="synthetic", data_kwargs=dict(n_train=64, n_test=32, dim=6, num_classes=3, seed=1),
                  arch="mlp", arch_kwargs=dict(widths=(8, 8)), preset="fully_si", lr_w=10.0, lr_g=0.1,
                  batch_size=16, steps=4, eval_every=0, log_every=1, seed=3, dtype="float64")
    return dataclasses.replace(base, **kw)


def run_steps(config: Config, n: int):
    """``n`` jitted steps under x64, guarded by ``chex.assert_max_traces(n=1)``; states and host metrics."""
    with train.precision(config.dtype):
        ds = train.load_dataset(config)
        setup = train.create_train_state(config, ds, jax.random.key(config.seed))
        chex.clear_trace_counter()
        step = steps.make_train_step(setup.model, setup.labels, setup.lr_w, max_traces=1)
        batch = train.batch_fn(config, ds)
        states, outs = [setup.state], []
        for t in range(n):
            state, out = step(states[-1], *batch(t))
            states.append(state)
            outs.append(jax.device_get(out))
    return ds, setup, step, states, outs


def lemma24_tolerance(old, new, labels) -> float:
    """Round-off bound of ``||w_{t+1}||^2 - ||w_t||^2 - lr^2 ||g||^2``, max over groups.

    Each of the three terms (and the ``2 lr <g, w>`` that Lemma 2.4 says is 0) is computed with a relative
    error of a few eps (one rounding per entry of ``w - lr g``, pairwise sums over at most 64 entries), each
    at most ``(||w_t|| + lr ||g||)^2``; ``lr ||g|| = ||w_{t+1} - w_t||`` for plain (S)GD. 100 eps of that
    scale (3 eps was seen) is the tolerance.
    """
    with train.precision("float64"):  # outside x64, jnp would truncate the float64 params to float32
        w_sq = G.group_sq_norms(old, labels)
        d_sq = G.group_sq_norms(jax.tree_util.tree_map(np.subtract, new, old), labels)
    return max(100 * EPS64 * float(np.max((np.sqrt(w_sq[k]) + np.sqrt(d_sq[k])) ** 2)) for k in w_sq)


@pytest.fixture(scope="module")
def sgd_run():
    return run_steps(tiny(), 4)


# ------------------------------------------------------------------------------------------------
# The train step


def test_lemma24_residual_is_round_off_in_float64(sgd_run):
    _, setup, _, states, outs = sgd_run
    assert jax.tree_util.tree_leaves(states[-1].params)[0].dtype == np.float64
    for t, out in enumerate(outs):
        tol = lemma24_tolerance(states[t].params, states[t + 1].params, setup.labels)
        assert out["lemma24_residual"] <= tol, (t, out["lemma24_residual"], tol)
        # the norms grow (Lemma 2.4: strictly, since the gradient is not 0)
        with train.precision("float64"):
            before = G.group_sq_norms(states[t].params, setup.labels)
            after = G.group_sq_norms(states[t + 1].params, setup.labels)
        assert all(float(after[k]) > float(before[k]) for k in before)


def test_step_metrics_match_an_independent_computation(sgd_run):
    _, setup, _, states, outs = sgd_run
    lr = 10.0
    for t, out in enumerate(outs):
        groups = G.si_groups(states[t].params, setup.labels)
        assert groups == {"layer0:kernel": ["layer0/kernel"], "layer1:kernel": ["layer1/kernel"]}
        assert {k.split("/", 1)[1] for k in out if k.startswith("eff_lr/")} == set(groups)
        for k in groups:  # fully_si: each group is one kernel, '<layer>:kernel'
            layer = k.split(":")[0]
            w0 = np.ravel(states[t].params[layer]["kernel"])
            w1 = np.ravel(states[t + 1].params[layer]["kernel"])
            np.testing.assert_allclose(out[f"norm/{k}"], np.linalg.norm(w0), rtol=1e-12)
            np.testing.assert_allclose(out[f"eff_lr/{k}"], lr / (w0 @ w0), rtol=1e-12)
            cos = (w0 @ w1) / (np.linalg.norm(w0) * np.linalg.norm(w1))
            np.testing.assert_allclose(out[f"angle/{k}"], np.arccos(np.clip(cos, -1, 1)), rtol=1e-6)
        assert out["lr_w"] == lr and 0 <= out["accuracy"] <= 1 and out["grad_sq_intrinsic"] > 0


def test_step_metrics_summarise_per_channel_groups_as_means():
    w = np.array([[3.0, 0.0], [4.0, 1.0]])  # channel norms 5 and 1
    g = np.array([[4.0, 1.0], [-3.0, 0.0]])  # orthogonal to w, channel by channel
    labels = {"k": G.si("k", per_channel=True)}
    lr = 0.5
    new = w - lr * g
    with train.precision("float64"):
        out = jax.device_get(R.summarize(R.step_record({"k": w}, {"k": new}, {"k": g}, labels, lr)))
    np.testing.assert_allclose(out["norm/k"], (5.0 + 1.0) / 2, rtol=1e-15)
    np.testing.assert_allclose(out["eff_lr/k"], (lr / 25 + lr / 1) / 2, rtol=1e-15)
    np.testing.assert_allclose(out["grad_sq_intrinsic"], 25 * 25 + 1 * 1, rtol=1e-15)
    assert out["lemma24_residual"] <= 10 * EPS64 * 25
    new[0, 1] += 1.0  # break the update of channel 1 only: the residual is the max over channels
    with train.precision("float64"):
        out = jax.device_get(R.summarize(R.step_record({"k": w}, {"k": new}, {"k": g}, labels, lr)))
    np.testing.assert_allclose(out["lemma24_residual"], (-0.5 + 1.0) ** 2 - 0.5 ** 2, rtol=1e-12)


def test_frozen_params_stay_bit_identical(sgd_run):
    _, setup, _, states, _ = sgd_run
    flat0 = G.flatten_labelled(states[0].params, setup.labels)
    frozen = [(path, leaf) for path, leaf, label in flat0 if label.kind == G.FROZEN]
    assert [p for p, _ in frozen] == ["classifier/kernel"]
    for state in states[1:]:
        now = dict((p, l) for p, l, _ in G.flatten_labelled(state.params, setup.labels))
        for path, leaf in frozen:
            assert np.array_equal(np.asarray(now[path]), np.asarray(leaf))
    assert not np.array_equal(states[0].params["layer0"]["kernel"], states[-1].params["layer0"]["kernel"])


def test_step_is_traced_once_and_the_guard_works(sgd_run):
    ds, _, step, states, _ = sgd_run  # 4 steps ran under chex.assert_max_traces(n=1)
    with train.precision("float64"), pytest.raises(AssertionError, match="traced > 1 times"):
        step(states[-1], ds.x_train[:8], ds.y_train[:8])  # a new batch shape would retrace


def test_weight_decay_breaks_lemma24_by_the_predicted_amount():
    lr, wd = 10.0, 1e-3
    config = tiny(weight_decay=wd, batch_size=0)  # full-batch GD
    _, setup, _, states, outs = run_steps(config, 2)
    for t, out in enumerate(outs):
        # w' = (1 - lr wd) w - lr g with <g, w> = 0: residual ((1 - lr wd)^2 - 1) ||w||^2 per group
        with train.precision("float64"):
            w_sq = G.group_sq_norms(states[t].params, setup.labels)
        expected = abs((1 - lr * wd) ** 2 - 1) * max(float(v) for v in w_sq.values())
        tol = lemma24_tolerance(states[t].params, states[t + 1].params, setup.labels)
        np.testing.assert_allclose(out["lemma24_residual"], expected, rtol=1e-8)
        assert expected > 1e8 * tol, (expected, tol)


def test_eval_step_uses_running_statistics(sgd_run):
    ds, setup, _, states, _ = sgd_run
    state = states[-1]
    x, y = ds.x_train[:16], ds.y_train[:16]
    with train.precision("float64"):
        eval_step = steps.make_eval_step(setup.model)
        whole = eval_step(state, x, y)["loss"]
        halves = [eval_step(state, x[i:i + 8], y[i:i + 8])["loss"] for i in (0, 8)]
        train_whole = models.batch_loss(setup.model, state.params, state.batch_stats, x, y, True)[0]
        train_halves = [models.batch_loss(setup.model, state.params, state.batch_stats, x[i:i + 8], y[i:i + 8],
                                          True)[0] for i in (0, 8)]
    # eval mode treats examples independently (running statistics): the mean over halves is the mean
    np.testing.assert_allclose(whole, np.mean(halves), rtol=1e-12)
    # train mode normalises with batch statistics: splitting the batch changes the loss
    assert abs(float(train_whole) - float(np.mean(train_halves))) > 1e-6
    assert abs(float(whole) - float(train_whole)) > 1e-6
    assert not np.allclose(state.batch_stats["bn0"]["mean"], 0.0)  # running statistics were updated


# ------------------------------------------------------------------------------------------------
# Batches


def test_batch_fn_is_full_batch_for_gd_and_batch_at_for_sgd():
    config = tiny(dtype="float32")
    ds = train.load_dataset(config)
    for t in (0, 3, 11):
        x, y = train.batch_fn(config, ds)(t)
        ex, ey = data.batch_at(ds.x_train, ds.y_train, 16, config.seed, t)
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    x, y = train.batch_fn(dataclasses.replace(config, batch_size=0), ds)(5)
    np.testing.assert_array_equal(np.asarray(x), ds.x_train)
    np.testing.assert_array_equal(np.asarray(y), ds.y_train)


# ------------------------------------------------------------------------------------------------
# train_and_evaluate: outputs and determinism


def _strict_json(line: str):
    def reject(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(line, parse_constant=reject)


def test_train_and_evaluate_writes_metrics_and_summary_deterministically(tmp_path, capsys):
    config = tiny(dtype="float32", preset="paper", batch_size=0, steps=6, log_every=2, eval_every=3,
                  lr_w=0.1)
    summaries = [train.train_and_evaluate(config, str(tmp_path / name)) for name in ("a", "b")]
    out = capsys.readouterr().out
    assert "step 2  loss" in out and "eff_lr" in out and "eval step 3" in out

    text = (tmp_path / "a" / "metrics.jsonl").read_text()
    assert text == (tmp_path / "b" / "metrics.jsonl").read_text()  # same seed, same numbers
    records = [_strict_json(line) for line in text.splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(0, "train"), (2, "train"), (3, "test"),
                                                         (4, "train"), (5, "train"), (6, "test")]
    for r in records:
        assert all(isinstance(v, (int, float, str)) for v in r.values())
        if r["split"] == "train":
            for key in ("loss", "accuracy", "lr_w", "grad_sq_intrinsic", "lemma24_residual",
                        "eff_lr/layer0:kernel", "norm/bn0:affine", "angle/classifier:kernel"):
                assert isinstance(r[key], float), key
            assert "eff_lr/bn_out:affine" not in r  # the last BN is scale-variant
        else:
            assert set(r) == {"step", "split", "loss", "accuracy"}

    summary = _strict_json((tmp_path / "a" / "summary.json").read_text())
    for key in ("final_train_loss", "test_loss", "test_accuracy", "effective_lr", "wall_time_s", "config",
                "jax", "jaxlib", "backend", "device", "bn"):
        assert key in summary, key
    assert summary["config"]["lr_w"] == 0.1 and summary["config"]["arch_kwargs"] == {"widths": [8, 8]}
    assert summary["bn"] == "exact" and summary["test_loss"] == records[-1]["loss"]
    assert summary["final_train_loss"] == records[-2]["loss"]
    assert set(summary["effective_lr"]) == {"layer0:kernel", "bn0:affine", "layer1:kernel", "bn1:affine",
                                            "classifier:kernel"}
    assert not list(tmp_path.glob("*/*.tmp*"))
    assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]

    # a second run into the same workdir is refused, and the first run's files are untouched
    with pytest.raises(ConfigError, match="already holds a run"):
        train.train_and_evaluate(config, str(tmp_path / "a"))
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == text


# ------------------------------------------------------------------------------------------------
# Validation: bad inputs raise one-line errors and write nothing


@pytest.mark.parametrize("change", [
    dict(lr_w=0.0), dict(lr_w=-1.0), dict(lr_w=float("nan")), dict(lr_g=float("inf")), dict(steps=0),
    dict(batch_size=-1), dict(log_every=0), dict(seed=-1), dict(dtype="float16"), dict(arch="mlpx"),
    dict(preset="nope"), dict(grouping="row"), dict(schedule="cosine"), dict(momentum=1.0),
    dict(weight_decay=-0.1), dict(bn="batchy"), dict(preset="no_bn", bn="exact"), dict(dataset="mnist"),
    dict(steps=2.5), dict(project="yes"),
])
def test_validate_config_rejects(change, tmp_path):
    config = dataclasses.replace(tiny(), **change)
    with pytest.raises(ConfigError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, error", [
    (dict(batch_size=1000), ConfigError),
    (dict(arch_kwargs=dict(depth=2)), ConfigError),
    (dict(data_kwargs=dict(n_train=64)), ConfigError),  # the loader's required arguments are missing
    (dict(data_kwargs=dict(n_train=64, n_test=8, dim=3, num_classes=2, seed=0, noise=-1.0)), ValueError),
])
def test_errors_found_at_setup_write_nothing(change, error, tmp_path):
    with pytest.raises(error):
        train.train_and_evaluate(dataclasses.replace(tiny(dtype="float32"), **change), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_label_mismatch_is_a_label_error(monkeypatch, tmp_path):
    real = models.BNNet.labels

    def missing_layer(self, grouping="layer"):
        tree = real(self, grouping)
        del tree["layer1"]
        return tree

    monkeypatch.setattr(models.BNNet, "labels", missing_layer)
    with pytest.raises(G.LabelError, match="layer1/kernel"):
        train.train_and_evaluate(tiny(dtype="float32"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bn", ("exact", "smooth", "standard"))
@pytest.mark.parametrize("arch, shape", [("mlp", (6,)), pytest.param("convnet", (8, 8, 3), marks=pytest.mark.slow)])
def test_a_bfloat16_model_keeps_its_dtypes_and_compiles_once(bn, arch, shape):
    """Built with ``param_dtype=bfloat16`` on bfloat16 inputs (the benchmarks' accelerator setting), a train
    step returns every leaf of the state (params, BN running statistics, optimizer state) in the dtype it
    came in, so the second step reuses the first one's compilation (``max_traces=1`` raises otherwise). The
    control: the same state with the running statistics cast to float32 is a new signature, a retrace."""
    import jax.numpy as jnp
    from rate_tuning import optim

    kw = {"widths": (8,)} if arch == "mlp" else {"channels": (4, 6)}
    model = models.build(arch, "smoothed" if bn == "smooth" else "paper", bn=bn, param_dtype=jnp.bfloat16, **kw)
    labels = model.labels("layer")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8,) + shape), jnp.bfloat16)
    y = jnp.asarray(rng.integers(0, 10, 8))
    v = model.init(jax.random.key(0), x)
    lr_w = optim.constant(0.1)
    state = steps.TrainState.create(apply_fn=model.apply, params=v["params"], batch_stats=v["batch_stats"],
                                    tx=optim.two_rate_sgd(labels, lr_w, optim.constant(0.1)))
    chex.clear_trace_counter()
    step = steps.make_train_step(model, labels, lr_w, max_traces=1)
    dtypes = lambda s: jax.tree_util.tree_map(lambda a: str(a.dtype), (s.params, s.batch_stats, s.opt_state))
    new, _ = step(state, x, y)
    assert dtypes(new) == dtypes(state)
    assert {str(a.dtype) for a in jax.tree_util.tree_leaves(new.batch_stats)} == {"bfloat16"}
    step(new, x, y)  # same signature: no retrace
    promoted = new.replace(batch_stats=jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), new.batch_stats))
    with pytest.raises(AssertionError, match="traced > 1"):
        step(promoted, x, y)
