"""Sweeps (vmap over runs, scan over steps) against independent single runs, and their bookkeeping.

Toy problem, written here so that the test does not depend on proofs_check: ``w`` in R^6 scale-invariant,
``g`` in R^2 scale-variant with curvature ``Q`` (so GD on ``g`` is stable iff ``lr_g < 2/Q``), and a
frozen scalar ``f``::

    L(w, g, f) = u^T A u + 0.5 sin(b^T u) + 0.5 Q ||g||^2 + 0.3 g_0 u_0 + f u_1,     u = w / ||w||.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rate_tuning import data, groups as G, models, optim, sweep as S

D, Q = 6, 4.0
_rng = np.random.default_rng(0)
_M = _rng.normal(size=(D, D))
A, B = (_M + _M.T) / 2, _rng.normal(size=D)
LABELS = {"w": G.si("w"), "g": G.VARIANT_LABEL, "f": G.FROZEN_LABEL}
EPS64 = np.finfo(np.float64).eps


def toy_loss(p):
    u = p["w"] / jnp.linalg.norm(p["w"])
    return u @ A @ u + 0.5 * jnp.sin(B @ u) + 0.5 * Q * jnp.sum(p["g"] ** 2) + 0.3 * p["g"][0] * u[0] + p["f"][0] * u[1]


def toy_init(key):
    kw, kg = jax.random.split(key)
    return {"w": jax.random.normal(kw, (D,)), "g": jax.random.normal(kg, (2,)), "f": jnp.array([0.5])}


TOY_VALUE_AND_GRAD = jax.jit(jax.value_and_grad(toy_loss))  # module level: compiled once (jit caches by function)


def reference_run(lr_w, lr_g, seed, steps, schedule="constant", **opt):
    """One run the way a user writes it: two_rate_sgd + optax.apply_updates in a Python loop; the metrics
    with numpy formulas (not rate_tuning.metrics)."""
    params = toy_init(jax.random.key(seed))
    tx = optim.two_rate_sgd(LABELS, optim.schedule(schedule, lr_w), optim.schedule(schedule, lr_g), **opt)
    state = tx.init(params)
    out = {"loss": [], "w_sq": [], "grad_sq": [], "eff_lr": []}
    for t in range(steps):
        loss, grads = TOY_VALUE_AND_GRAD(params)
        w, gw, gg = (np.asarray(a) for a in (params["w"], grads["w"], grads["g"]))
        lr_t = lr_w if schedule == "constant" else lr_w / np.sqrt(t + 1)
        out["loss"].append(float(loss))
        out["w_sq"].append(w @ w)
        out["grad_sq"].append((w @ w) * (gw @ gw) + gg @ gg)  # ||grad L(V; g)||^2 by the Sec. 2 lemma
        out["eff_lr"].append(lr_t / (w @ w))
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return {k: np.array(v) for k, v in out.items()}, params


# Tolerance of "equal to float64 round-off". The sweep and the reference evaluate the same formulas in
# differently compiled programs (vmap-batched reductions and dots, fusion, traced vs constant rates),
# so each step's loss and gradient may differ by the round-off of its longest sum, u^T A u with D^2 terms:
# relative <= D^2 eps (the standard bound gamma_n <= n eps). Over T steps of a map that does not expand
# errors these add up: T D^2 eps (T = 30: 2.4e-13). Measured: at most 2% of that (5e-15) on loss, norms,
# intrinsic gradient norm, effective lr and final params, relative to each quantity's scale (max |.|).
def round_off_tol(steps):
    return steps * D ** 2 * EPS64


def assert_close_to_scale(actual, expected, tol, what):
    scale = max(np.max(np.abs(expected)), 1e-300)
    err = np.max(np.abs(np.asarray(actual) - expected)) / scale
    assert err <= tol, f"{what}: relative deviation {err:.2e} > {tol:.1e}"


# 4 runs: lr_w in {0.1, 100} x seeds {0, 1}, lr_g = 0.2 < 2/Q. Flat arrays as run_sweep takes them.
GRID = S.grid(lr_w=[0.1, 100.0], lr_g=[0.2], seeds=[0, 1])
RUNS = dict(lr_w=GRID.lr_w, lr_g=GRID.lr_g, seeds=GRID.seeds)
STEPS = 30


@functools.lru_cache(maxsize=None)
def gd_sweep(strategy, record_every=1):
    """The GD sweep of RUNS (float64), shared by the tests below: one compilation each."""
    with jax.enable_x64(True):
        return S.run_sweep(toy_loss, toy_init, LABELS, **RUNS, steps=STEPS, strategy=strategy,
                           record_every=record_every, return_params=True, shape=GRID.shape)


@pytest.mark.parametrize("opt", [dict(), dict(schedule="inverse_sqrt", momentum=0.9, weight_decay=1e-2),
                                 dict(project=True)], ids=["gd", "sqrt-momentum-wd", "projected"])
def test_vmapped_sweep_equals_independent_runs(x64, opt):
    res = gd_sweep("vmap") if not opt else S.run_sweep(
        toy_loss, toy_init, LABELS, **RUNS, steps=STEPS, strategy="vmap", return_params=True, **opt)
    assert res.strategy == "vmap" and res.dtype == "float64" and res.loss.shape == (4, STEPS)
    tol = round_off_tol(STEPS)
    for r, (lw, lg, seed) in enumerate(zip(*RUNS.values())):
        ref, params = reference_run(lw, lg, int(seed), STEPS, **opt)
        assert_close_to_scale(res.loss[r], ref["loss"], tol, f"run {r} loss")
        assert_close_to_scale(res.w_sq["w"][r], ref["w_sq"], tol, f"run {r} ||w||^2")
        assert_close_to_scale(res.grad_sq_intrinsic[r], ref["grad_sq"], tol, f"run {r} intrinsic grad")
        assert_close_to_scale(res.eff_lr["w"][r], ref["eff_lr"], tol, f"run {r} effective lr")
        for k in ("w", "g"):
            assert_close_to_scale(res.final_params[k][r], np.asarray(params[k]), tol, f"run {r} final {k}")
        assert np.array_equal(res.final_params["f"][r], np.asarray(params["f"]))  # frozen: bit-identical
        parts = res.grad_sq_intrinsic_groups["w"][r] + res.grad_sq_intrinsic_groups["variant"][r]
        np.testing.assert_allclose(parts, res.grad_sq_intrinsic[r], rtol=4 * EPS64)
    assert np.all(res.diverged == -1)


def test_vmap_and_loop_strategies_agree(x64):
    vmapped, looped = gd_sweep("vmap"), gd_sweep("loop")
    assert looped.strategy == "loop"
    tol = round_off_tol(STEPS)
    for name in ("loss", "grad_sq_intrinsic", "final_loss"):
        assert_close_to_scale(getattr(looped, name), getattr(vmapped, name), tol, name)
    assert_close_to_scale(looped.w_sq["w"], vmapped.w_sq["w"], tol, "w_sq")
    for k in ("w", "g"):
        assert_close_to_scale(looped.final_params[k], vmapped.final_params[k], tol, f"final {k}")


def test_grid_shapes_reshape_and_record_every(x64):
    g = S.grid(lr_w=[0.5, 5.0], lr_g=[0.1], seeds=[3, 4, 5])
    assert g.shape == (2, 1, 3)
    np.testing.assert_array_equal(g.lr_w, [0.5] * 3 + [5.0] * 3)
    np.testing.assert_array_equal(g.seeds, [3, 4, 5, 3, 4, 5])
    assert GRID.shape == (2, 1, 2)
    full, sparse = gd_sweep("vmap"), gd_sweep("vmap", record_every=7)
    np.testing.assert_array_equal(sparse.record_steps, [0, 7, 14, 21, 28])  # 30 = 4 blocks of 7 + 2
    assert full.loss.shape == (4, STEPS) and sparse.loss.shape == (4, 5)
    assert sparse.reshape(sparse.loss).shape == (2, 1, 2, 5)
    assert sparse.reshape(sparse.loss)[1, 0, 0, 2] == sparse.loss[2, 2]  # lr_w = 100, seed 0, t = 14
    tol = round_off_tol(STEPS)
    for name in ("loss", "grad_sq_intrinsic", "lr_w_t"):
        assert_close_to_scale(getattr(sparse, name), getattr(full, name)[:, ::7], tol, name)
    assert_close_to_scale(sparse.w_sq["w"], full.w_sq["w"][:, ::7], tol, "w_sq")
    assert_close_to_scale(sparse.final_loss, full.final_loss, tol, "final loss")  # the same 30 steps
    np.testing.assert_array_equal(full.lr_w_t[:, 0], GRID.lr_w)


def test_diverging_run_is_flagged_and_does_not_poison_the_others(x64):
    steps = 100
    bad_lr_g = 50.0  # 2/Q = 0.5: g_t ~ (1 - lr_g Q)^t = (-199)^t overflows after ~70 steps in float64
    sweep = S.make_sweep(toy_loss, toy_init, LABELS, steps=steps, strategy="vmap")
    res = sweep(lr_w=[1.0, 1.0, 10.0], lr_g=[0.1, bad_lr_g, 0.1], seeds=[0, 0, 1])
    t_bad = res.diverged[1]
    assert 0 < t_bad < steps, res.diverged
    assert np.all(np.isfinite(res.loss[1, :t_bad])) and not np.isfinite(res.loss[1, t_bad])
    assert not np.isfinite(res.final_loss[1])
    np.testing.assert_array_equal(res.diverged[[0, 2]], [-1, -1])
    clean = sweep(lr_w=[1.0, 1.0, 10.0], lr_g=[0.1, 0.1, 0.1], seeds=[0, 0, 1])  # same program, no NaN
    for name in ("loss", "grad_sq_intrinsic"):  # the good runs are the runs made without the diverging one
        good = getattr(res, name)[[0, 2]]
        assert np.all(np.isfinite(good))
        assert_close_to_scale(good, getattr(clean, name)[[0, 2]], round_off_tol(steps), name)


def stochastic_toy():
    """``L(w, g; X) = mean_i (x_i^T u)^2 + 0.5 Q ||g||^2 + 0.3 g_0 u_0`` on mini-batches of 40 points."""
    x = np.random.default_rng(1).normal(size=(40, D))
    y = np.arange(40)

    def loss(p, batch):
        xb, _ = batch
        u = p["w"] / jnp.linalg.norm(p["w"])
        return jnp.mean((xb @ u) ** 2) + 0.5 * Q * jnp.sum(p["g"] ** 2) + 0.3 * p["g"][0] * u[0] + p["f"][0]

    return x, y, loss


def test_minibatch_fn_is_deterministic_per_seed_and_differs_across_seeds(x64):
    x, y, loss = stochastic_toy()
    batch_fn = S.minibatch_fn(x, y, batch_size=8, seeds=(5, 6, 7, 8), steps=12)  # 5 batches per epoch
    jitted = jax.jit(batch_fn)
    ids = lambda seed, t: np.asarray(jitted(jnp.int32(seed), jnp.int32(t))[1])
    epoch0 = np.concatenate([ids(7, t) for t in range(5)])
    assert sorted(epoch0) == list(range(40))  # an epoch is a permutation: without replacement
    np.testing.assert_array_equal(ids(7, 3), ids(7, 3))
    xb, yb = jitted(jnp.int32(7), jnp.int32(3))
    np.testing.assert_array_equal(np.asarray(xb), x[np.asarray(yb)])  # rows and labels stay paired
    assert not np.array_equal(epoch0, np.concatenate([ids(8, t) for t in range(5)]))  # other seed
    assert not np.array_equal(epoch0, np.concatenate([ids(7, t) for t in range(5, 10)]))  # next epoch
    sgd = S.make_sweep(loss, toy_init, LABELS, steps=12, batch_fn=batch_fn, schedule="inverse_sqrt",
                       full_loss_fn=lambda p: loss(p, (x, y)))
    assert sgd.flops is not None and sgd.strategy == "vmap"  # 'auto', from the step on one 8-row batch
    runs = dict(lr_w=[1.0, 1.0, 1.0], lr_g=[0.1, 0.1, 0.1], seeds=[5, 5, 6])
    a, b = sgd(**runs), sgd(**runs)
    np.testing.assert_array_equal(a.loss, b.loss)  # the whole sweep is a function of the seeds
    np.testing.assert_array_equal(a.loss[0], a.loss[1])
    assert not np.allclose(a.loss[0], a.loss[2])
    assert a.full_loss.shape == a.loss.shape and np.all(np.isfinite(a.full_grad_sq))
    with pytest.raises(ValueError, match="no batches for seeds"):  # the table holds seeds 5-8 only
        sgd(lr_w=[1.0], lr_g=[0.1], seeds=[9])
    with pytest.raises(ValueError, match="covers steps"):  # ... and steps 0-12
        S.make_sweep(loss, toy_init, LABELS, steps=13, batch_fn=batch_fn)


def test_minibatch_fn_follows_the_training_order():
    x = np.arange(40, dtype=np.float32)[:, None]
    y = np.arange(40, dtype=np.int32)
    fn = S.minibatch_fn(x, y, 8, seeds=(3, 5), steps=12)
    for seed in (3, 5):
        for t in (0, 4, 7, 11):
            xb, yb = fn(np.int32(seed), np.int32(t))
            perm = data.epoch_permutation(40, seed, t // 5)
            assert np.array_equal(np.asarray(yb), perm[(t % 5) * 8:(t % 5 + 1) * 8])
            assert np.array_equal(np.asarray(xb)[:, 0], np.asarray(yb, np.float32))


def test_bn_mlp_sweep_norms_follow_lemma_2_4(x64):
    x = np.random.default_rng(2).normal(size=(32, 5))
    y = np.arange(32) % 3
    model = models.build("mlp", "paper", widths=(8,), num_classes=3, param_dtype=jnp.float64)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(x))
    problem = S.bn_problem(model, variables["params"], variables["batch_stats"], x, y, same_init=True)
    labels = model.labels("layer")
    lr_w = np.array([0.1, 1.0, 10.0])
    res = S.run_sweep(problem.loss_fn, problem.init_fn, labels, lr_w=lr_w, lr_g=[0.05] * 3, seeds=[0] * 3,
                      steps=15, strategy="vmap")
    assert set(res.w_sq) == {"layer0:kernel", "bn0:affine", "classifier:kernel"}
    np.testing.assert_allclose(res.loss[:, 0], res.loss[0, 0], rtol=0)  # same init for all three
    for k, w_sq in res.w_sq.items():
        n = sum(np.size(leaf) for path, leaf, l in G.flatten_labelled(variables["params"], labels)
                if l.kind == G.SI and l.group == k)
        # Lemma 2.4: ||w_{t+1}||^2 = ||w_t||^2 + lr_w^2 ||grad_w||^2, with ||grad_w||^2 = grad_sq_intrinsic_groups / ||w||^2.
        # Each squared norm is a sum of n squares (relative round-off <= n eps) and the increment a product
        # of three recorded numbers (a few eps): residual <= (2 n + 8) eps ||w_{t+1}||^2.
        tol = (2 * n + 8) * EPS64
        step = res.lr_w_t[:, :-1] ** 2 * res.grad_sq_intrinsic_groups[k][:, :-1] / w_sq[:, :-1]
        resid = np.abs(w_sq[:, 1:] - w_sq[:, :-1] - step) / w_sq[:, 1:]
        assert np.max(resid) <= tol, (k, np.max(resid), tol)
        assert np.all(np.diff(w_sq, axis=1) >= -tol * w_sq[:, 1:]), k  # non-decreasing norms (C5)
        assert np.all(np.diff(res.eff_lr[k], axis=1) <= tol * res.eff_lr[k][:, 1:]), k
    assert np.all(res.diverged == -1)
    # per-channel groups (C21): the grouping changes the bookkeeping, not the dynamics (every 'si' leaf has
    # the rate lr_w), so the channels' squared norms add up to the layer's, up to the round-off of two
    # programs over 15 steps (as in round_off_tol, with the n = 40 entries of the kernel for D^2).
    # The runs re-initialise (same_init=False) with seed 0: init_fn(key(0)) must be model.init(key(0), x).
    fresh = S.bn_problem(model, variables["params"], variables["batch_stats"], x, y)
    chan = S.run_sweep(fresh.loss_fn, fresh.init_fn, model.labels("channel"), lr_w=lr_w, lr_g=[0.05] * 3,
                       seeds=[0] * 3, steps=15, strategy="vmap", keep_channels=True)
    np.testing.assert_allclose(chan.loss[:, 0], res.loss[:, 0], rtol=1e-13)  # the same theta_0 (else O(1))
    w_c = chan.w_sq["layer0:kernel"]
    assert w_c.shape == (3, 15, 8) and chan.w_sq["bn0:affine"].shape == (3, 15)  # 8 channels; a 2-leaf group
    assert_close_to_scale(w_c.sum(-1), res.w_sq["layer0:kernel"], 15 * 40 * EPS64, "sum over channels")
    np.testing.assert_allclose(chan.eff_lr["layer0:kernel"], chan.lr_w_t[..., None] / w_c, rtol=2 * EPS64)
    assert np.all(np.diff(w_c, axis=1) >= -(2 * 5 + 8) * EPS64 * w_c[:, 1:])  # per channel: 5 inputs


def test_auto_rule_and_validation():
    assert S.choose_strategy(S.AUTO_VMAP_MAX_FLOPS, "cpu") == "vmap"
    assert S.choose_strategy(S.AUTO_VMAP_MAX_FLOPS * 1.01, "cpu") == "loop"
    assert S.choose_strategy(None, "cpu") == "loop"  # no estimate: the safe choice on CPU
    assert S.choose_strategy(1e15, "gpu") == "vmap"
    sweep = S.make_sweep(toy_loss, toy_init, LABELS, steps=2)  # 'auto': the toy's step is a few 100 flops
    assert sweep.strategy == "vmap" and 0 < sweep.flops < 1e4 and sweep.n_params == D + 2 + 1
    with pytest.raises(ValueError, match="one entry per run"):
        sweep([1.0, 2.0], [0.1], [0, 1])
    with pytest.raises(ValueError, match="lr_g must be a positive finite number"):
        sweep([1.0], [-0.1], [0])
    with pytest.raises(ValueError, match="seeds"):
        sweep([1.0], [0.1], [-1])
    with pytest.raises(ValueError, match="unknown strategy"):
        S.make_sweep(toy_loss, toy_init, LABELS, steps=2, strategy="pmap")
    with pytest.raises(ValueError, match="unknown schedule"):
        S.make_sweep(toy_loss, toy_init, LABELS, steps=2, schedule="cosine")
    with pytest.raises(G.LabelError, match="no label for parameter g"):
        S.make_sweep(toy_loss, toy_init, {"w": G.si("w"), "f": G.FROZEN_LABEL}, steps=2)


@pytest.mark.slow
def test_bn_problem_applies_conv_models_without_convolution_ops_on_cpu(x64):
    """The sweep runs steps under lax.scan, where XLA:CPU convolutions are naive (jax-ml/jax#12868):
    bn_problem applies a conv_impl='auto' model through models.for_loops (im2col on CPU: no convolution
    op in the loss); an explicit conv_impl, and anything without one, is left as it is."""
    x = np.random.default_rng(3).normal(size=(8, 8, 8, 3))
    y = np.arange(8) % 4
    # vgg: its second layer (8 input channels, stride 1) is XLA's convolution under 'auto' on CPU outside loops
    model = models.build("vgg", "paper", config=(8, "M", 6, "M"), num_classes=4, param_dtype=jnp.float64)
    variables = model.init(jax.random.key(0), jnp.asarray(x))
    problem = S.bn_problem(model, variables["params"], variables["batch_stats"], x, y)
    hlo = lambda f: jax.jit(jax.grad(f)).lower(variables["params"]).as_text()  # noqa: E731
    direct = models.batch_loss(model, variables["params"], variables["batch_stats"], x, y)[0]
    # the same function to float64 round-off: 1e-12 as in test_layers.test_conv_impls_give_the_same_model
    assert abs(float(problem.loss_fn(variables["params"]) - direct)) <= 1e-12
    if jax.default_backend() == "cpu":
        assert "convolution" not in hlo(problem.loss_fn)
        assert models.for_loops(model).conv_impl == "im2col"
    explicit = model.clone(conv_impl="xla")
    assert models.for_loops(explicit) is explicit
    assert models.for_loops(S) is S  # anything without a conv_impl
    # the control: without for_loops the same loss has convolution ops
    assert "convolution" in hlo(lambda p: models.batch_loss(model, p, variables["batch_stats"], x, y)[0])
