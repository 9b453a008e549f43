"""One per-step record (rate_tuning.record) behind every loop: train, sweep, proofs_check trajectories.

The same small run (a 'paper'-preset BN MLP, full-batch GD, float64, same initial params, same rates) goes
through the training loop (metrics.jsonl), a one-run sweep and a trajectory; every quantity the three share
must agree to round-off. Then the effective-rate formula is changed in one place
(``rate_tuning.metrics.effective_lr``) and all three must change with it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proofs_check import trajectories
from rate_tuning import configs, data, metrics, models, optim, rundir, sweep, train

STEPS = 6
LR_W, LR_G = 0.7, 0.05
TINY = ["data_kwargs.n_train=48", "data_kwargs.n_test=16", "data_kwargs.dim=5", "data_kwargs.num_classes=3",
        "arch_kwargs.widths=6,4", "batch_size=0", "dtype=float64", "log_every=1", "eval_every=0",
        "checkpoint_every=0", f"steps={STEPS}", f"lr_w={LR_W}", f"lr_g={LR_G}", "seed=2"]

# Round-off: each quantity is a handful of reductions over at most ~100 parameters per group, after STEPS
# steps whose parameters were computed in a different order by the three loops (one jit, a vmapped scan,
# a scan). The parameters then differ by ~STEPS * (number of terms in a gradient entry, <= 48 examples x
# 6 units) * eps ~ 2e-12 relative; derived quantities inherit it, so 1e-10 relative has 50x headroom and
# is 1e5x below the change the formula fault makes (a factor ||w|| ~ 1-10).
RTOL = 1e-10


def _run_all(tmp_path, tag: str) -> dict[str, dict]:
    config = configs.override(configs.get("synthetic"), TINY)
    workdir = tmp_path / tag
    train.train_and_evaluate(config, str(workdir), verbose=False)
    records = [r for r in rundir.read_metrics(str(workdir / rundir.METRICS_FILE)) if r["split"] == "train"]
    assert [r["step"] for r in records] == list(range(STEPS))
    groups = [k.split("/", 1)[1] for k in records[0] if k.startswith("eff_lr/")]
    assert groups, "the paper preset has scale-invariant groups"
    out = {"train": {"loss": np.array([r["loss"] for r in records]),
                     "grad_sq_intrinsic": np.array([r["grad_sq_intrinsic"] for r in records]),
                     **{f"eff_lr/{g}": np.array([r[f"eff_lr/{g}"] for r in records]) for g in groups},
                     **{f"w_sq/{g}": np.array([r[f"norm/{g}"] for r in records]) ** 2 for g in groups},
                     **{f"angle/{g}": np.array([r[f"angle/{g}"] for r in records]) for g in groups}}}

    with jax.enable_x64(True):
        dataset = train.load_dataset(config)
        setup = train.create_train_state(config, dataset, jax.random.key(config.seed))
        params0 = setup.state.params
        x, y = (jnp.asarray(a) for a in data.full_batch(dataset.x_train, dataset.y_train))
        problem = sweep.bn_problem(setup.model, params0, setup.state.batch_stats, x, y, same_init=True)
        res = sweep.run_sweep(problem.loss_fn, problem.init_fn, setup.labels, lr_w=[LR_W], lr_g=[LR_G], seeds=[0],
                              steps=STEPS, strategy="loop")
        out["sweep"] = {"loss": res.loss[0], "grad_sq_intrinsic": res.grad_sq_intrinsic[0],
                        **{f"eff_lr/{g}": res.eff_lr[g][0] for g in groups},
                        **{f"w_sq/{g}": res.w_sq[g][0] for g in groups}}

        def loss(p):
            return models.batch_loss(setup.model, p, setup.state.batch_stats, x, y, train=True)[0]

        tx = optim.two_rate_sgd(setup.labels, LR_W, LR_G)
        tr = trajectories.run(loss, params0, setup.labels, tx, STEPS, lr_w=LR_W, lr_g=LR_G)
        out["trajectory"] = {"loss": tr.loss, "grad_sq_intrinsic": tr.grad_sq_intrinsic,
                             **{f"eff_lr/{g}": tr.eff_lr[g] for g in groups},
                             **{f"w_sq/{g}": tr.w_sq[g] for g in groups},
                             **{f"angle/{g}": tr.angle[g] for g in groups}}
    return out


def _assert_shared_equal(out: dict[str, dict]) -> None:
    ref = out["train"]
    for source in ("sweep", "trajectory"):
        shared = sorted(set(ref) & set(out[source]))
        assert len(shared) >= 4, (source, shared)
        for key in shared:
            np.testing.assert_allclose(out[source][key], ref[key], rtol=RTOL, atol=0, err_msg=f"{source}: {key}")


def test_train_sweep_and_trajectory_record_the_same_quantities(tmp_path):
    _assert_shared_equal(_run_all(tmp_path, "plain"))


@pytest.mark.slow
def test_changing_the_effective_rate_in_one_place_changes_all_three(tmp_path, monkeypatch):
    before = _run_all(tmp_path, "before")

    def wrong_effective_lr(lr_w, params, labels):  # the fault: lr/||w|| instead of lr/||w||^2
        from rate_tuning import groups as G
        return {k: lr_w / jnp.sqrt(v) for k, v in G.group_sq_norms(params, labels).items()}

    monkeypatch.setattr(metrics, "effective_lr", wrong_effective_lr)
    after = _run_all(tmp_path, "after")
    _assert_shared_equal(after)  # still one definition: the three agree on the wrong formula
    for source in ("train", "sweep", "trajectory"):
        keys = [k for k in before[source] if k.startswith("eff_lr/")]
        assert keys
        for key in keys:
            # the new formula is the old one times ||w||, and ||w|| is far from 1 here
            w = np.sqrt(before[source][key.replace("eff_lr/", "w_sq/")])
            np.testing.assert_allclose(after[source][key], before[source][key] * w, rtol=RTOL)
            assert np.all(np.abs(w - 1.0) > 1e-3), f"{source}: norms too close to 1 to tell the formulas apart"
        # nothing else moved
        np.testing.assert_array_equal(after[source]["loss"], before[source]["loss"])


@pytest.mark.parametrize("grouping", ["layer", "channel"])
def test_summary_of_a_record_is_the_mean_over_channels(grouping):
    from rate_tuning import groups as G
    from rate_tuning import record as R

    w = np.array([[3.0, 0.0], [4.0, 1.0]])
    g = np.array([[4.0, 1.0], [-3.0, 0.0]])
    labels = {"k": G.si("k", per_channel=grouping == "channel")}
    with jax.enable_x64(True):
        rec = jax.device_get(R.step_record({"k": w}, {"k": w - 0.5 * g}, {"k": g}, labels, 0.5, loss=1.0))
        flat = jax.device_get(R.summarize(rec))
    w_sq = np.sum(w * w, axis=0) if grouping == "channel" else np.sum(w * w)
    np.testing.assert_allclose(rec[R.W_SQ]["k"], w_sq, rtol=1e-15)
    np.testing.assert_allclose(flat[f"{R.EFF_LR}/k"], np.mean(0.5 / w_sq), rtol=1e-15)
    np.testing.assert_allclose(flat[f"{R.NORM}/k"], np.mean(np.sqrt(w_sq)), rtol=1e-15)
    assert set(flat) == {R.LOSS, R.LR_W, R.INTRINSIC, R.LEMMA24, f"{R.NORM}/k", f"{R.EFF_LR}/k", f"{R.ANGLE}/k"}
