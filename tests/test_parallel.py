"""Data parallelism (:mod:`rate_tuning.parallel`): a sharded step is the full-batch step, on 8 CPU devices
and across 2 processes.

The multi-device checks run in subprocesses, because the device count is fixed when jax is imported:

* ``8dev``: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, float64, an MLP and a convnet (exact
  BN, preset ``paper``). Against the independent single-device computation (plain
  ``steps.make_train_step`` on one device with the whole batch) after 2 steps: params, BN running
  statistics and every metric agree to round-off; Lemma 2.4's identity
  ``||w_1||^2 - ||w_0||^2 = lr_w^2 ||grad_w F(theta_0)||^2`` holds per group for the sharded step's params
  with the single-device full-batch gradient; the compiled step contains all-reduces and each device
  holds B/8 examples; no retrace; an indivisible batch is refused.
* ``dist``: 2 processes joined by ``jax.distributed`` on 127.0.0.1 (one CPU device each, gloo
  collectives), 5 SGD steps of batch 32, float64, versus one process with one device.

Tolerances (float64, unit round-off u = 1.1e-16): the two computations differ only in the order of the
batch reductions (8 partial sums then an all-reduce, versus one sum of B terms), a relative error of
order ``B * u`` per reduction, about 1e-14 for B = 64, amplified by a few layers of BN's 1/sigma: we
allow ``TOL = 1e-11`` relative, and measured about 1e-14 (see the report printed with ``-s``).

Run a worker by hand: ``python tests/test_parallel.py 8dev OUT.json``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
TOL = 1e-11
TIMEOUT_S = 120
N_DEV = 8


# ------------------------------------------------------------------------------------------------
# Workers (run as ``python tests/test_parallel.py MODE ...`` in a fresh interpreter).


def _problem(arch: str, n: int, seed: int = 0):
    """A tiny float64 problem: model state from ``train.create_train_state`` and a data set of ``n``."""
    import jax
    from rate_tuning import configs, data, train

    rng = np.random.default_rng(seed)
    if arch == "mlp":
        shape, kw = (20,), {"widths": (16, 16)}
    else:
        shape, kw = (8, 8, 3), {"channels": (4, 8)}
    x = rng.normal(size=(n,) + shape)
    y = rng.integers(0, 10, n).astype(np.int32)
    ds = data.Dataset(x, y, x, y, 10, "synthetic")
    cfg = configs.Config(dataset="synthetic", arch=arch, arch_kwargs=kw, dtype="float64", batch_size=0,
                         lr_w=0.5, lr_g=0.1, verify_labels=False)  # labels: tested in test_train
    return train.create_train_state(cfg, ds, jax.random.key(seed)), x, y


def _rel_diff(a, b) -> float:
    import jax

    diffs = jax.tree_util.tree_map(
        lambda u, v: float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / max(np.max(np.abs(np.asarray(v))), 1e-30)),
        a, b)
    return max(jax.tree_util.tree_leaves(diffs))


def _drop_residual(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "lemma24_residual"}


def worker_8dev(out_path: str) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={N_DEV}"
    import chex
    import jax
    import jax.numpy as jnp

    from rate_tuning import groups as G
    from rate_tuning import models, parallel, steps

    report = {"device_count": jax.device_count()}
    with jax.enable_x64(True):
        mesh = parallel.data_mesh()
        for arch in ("mlp", "convnet"):
            setup, x, y = _problem(arch, 64)
            model, labels, lr_w = setup.model, setup.labels, setup.lr_w
            # reference: one device, whole batch, the plain step
            single = steps.make_train_step(model, labels, lr_w)
            ref1, m_ref = single(setup.state, jnp.asarray(x), jnp.asarray(y))
            ref2, m_ref2 = single(ref1, jnp.asarray(x), jnp.asarray(y))
            # the same step on 8 devices
            chex.clear_trace_counter()
            step = parallel.make_parallel_train_step(model, labels, lr_w, mesh, max_traces=1)
            st0 = parallel.replicate(mesh, setup.state)
            xs, ys = parallel.shard_batch(mesh, x, y)
            st1, m1 = step(st0, xs, ys)
            jax.block_until_ready(m1)
            st2, m2 = step(st1, x, y)  # host arrays are sharded by the step itself
            jax.block_until_ready(m2)
            st3, _ = step(st2, xs, ys)  # a third call: would raise if it retraced
            jax.block_until_ready(st3.params)
            # Lemma 2.4 with the full-batch gradient, computed independently on one device
            grads = jax.jit(jax.grad(lambda p: models.batch_loss(model, p, setup.state.batch_stats, jnp.asarray(x),
                                                                 jnp.asarray(y), True)[0]))(setup.state.params)
            p0, p1 = setup.state.params, parallel.to_host(st1.params)
            w0, w1, g = (G.group_sq_norms(t, labels) for t in (p0, p1, grads))
            lr = float(lr_w(0))
            lemma = {k: float(np.max(np.abs(w1[k] - w0[k] - lr ** 2 * g[k]) / np.maximum(w0[k], 1e-30))) for k in w0}
            hlo = step.jitted.lower(st0, xs, ys).compile().as_text()
            report[arch] = {
                "params_rel_diff": max(_rel_diff(st1.params, ref1.params), _rel_diff(st2.params, ref2.params)),
                "batch_stats_rel_diff": max(_rel_diff(st1.batch_stats, ref1.batch_stats),
                                            _rel_diff(st2.batch_stats, ref2.batch_stats)),
                # every metric but lemma24_residual, which is itself round-off (compared below)
                "metrics_rel_diff": max(_rel_diff(_drop_residual(m1), _drop_residual(m_ref)),
                                        _rel_diff(_drop_residual(m2), _drop_residual(m_ref2))),
                "loss": float(m1["loss"]),
                "lemma24_rel_residual_independent": max(lemma.values()),
                "lemma24_residual_in_step": float(m1["lemma24_residual"]),
                "lemma24_residual_in_step_single": float(m_ref["lemma24_residual"]),
                "lemma24_lhs_scale": float(max(lr ** 2 * np.max(g[k]) for k in g)),
                "all_reduces": hlo.count("all-reduce("),
                "x_shard_rows": sorted({s.data.shape[0] for s in xs.addressable_shards}),
                "param_sharding_replicated": all(a.sharding.is_fully_replicated
                                                 for a in jax.tree_util.tree_leaves(st3.params)),
                "n_groups": len(w0),
            }
        try:
            parallel.shard_batch(mesh, np.zeros((12, 3)), np.zeros(12, np.int32))
            report["indivisible_error"] = None
        except parallel.ParallelError as e:
            report["indivisible_error"] = str(e)
    with open(out_path, "w") as f:
        json.dump(report, f)


def worker_dist(mode: str, process_id: int, port: int, out_path: str, steps: int = 5, batch: int = 32) -> None:
    """``mode='dist'``: one of 2 processes of a jax.distributed run; ``'single'``: the 1-process reference."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    import jax

    from rate_tuning import parallel

    if mode == "dist":
        parallel.distributed_initialize(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=60)
    from rate_tuning import data
    from rate_tuning import steps as step_lib

    with jax.enable_x64(True):
        setup, x, y = _problem("mlp", 128)
        if mode == "dist":
            mesh = parallel.data_mesh()
            step = parallel.make_parallel_train_step(setup.model, setup.labels, setup.lr_w, mesh)
            state = parallel.replicate(mesh, setup.state)
        else:
            step, state = step_lib.make_train_step(setup.model, setup.labels, setup.lr_w), setup.state
        losses = []
        for t in range(steps):
            xb, yb = data.batch_at(x, y, batch, 0, t)  # the same global batch in every process
            state, m = step(state, xb, yb)
            jax.block_until_ready(m)  # JAX-NOTES: block in multi-device loops
            losses.append(float(parallel.to_host(m)["loss"]))
        params = parallel.to_host(state.params)
    agreement = None
    if mode == "dist":  # process 1 fails, process 0 must hear of it; then process 0's tree reaches process 1
        try:
            parallel.raise_if_any_failed(ValueError(f"bad input  in\nprocess {process_id}") if process_id else None)
        except ValueError as e:
            agreement = [type(e).__name__, str(e)]
        sent = parallel.broadcast_from_first({"a": np.full(3, 7.0 + process_id), "n": np.asarray(process_id)})
        agreement = [agreement, sent["a"].tolist(), int(sent["n"])]
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(out_path, **flat)
    with open(out_path + ".json", "w") as f:
        json.dump({"process_count": jax.process_count(), "device_count": jax.device_count(),
                   "local_device_count": jax.local_device_count(), "losses": losses, "agreement": agreement}, f)


# ------------------------------------------------------------------------------------------------
# Subprocess plumbing.


def _spawn(*args) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, HERE, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen], what: str) -> list[str]:
    deadline, outs = time.monotonic() + TIMEOUT_S, []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        pytest.fail(f"{what}: no result within {TIMEOUT_S} s")
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            pytest.fail(f"{what}: worker exited with {p.returncode}:\n{out[-3000:]}")
    return outs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every worker at once (they overlap on the 2 cores), return their results."""
    d = tmp_path_factory.mktemp("parallel")
    port = _free_port()
    eight = _spawn("8dev", d / "8dev.json")
    dist = [_spawn("dist", i, port, d / f"dist{i}.npz") for i in range(2)]
    single = _spawn("single", 0, 0, d / "single.npz")
    _wait([eight], "8-device worker")
    with open(d / "8dev.json") as f:
        report = json.load(f)
    _wait(dist + [single], "2-process jax.distributed run")
    params = {name: dict(np.load(d / f"{name}.npz")) for name in ("dist0", "dist1", "single")}
    meta = {}
    for name in ("dist0", "dist1", "single"):
        with open(d / f"{name}.npz.json") as f:
            meta[name] = json.load(f)
    print("\n8-device report:", json.dumps(report, indent=1))
    return report, params, meta


# ------------------------------------------------------------------------------------------------
# Tests.


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mlp", "convnet"])
def test_sharded_step_equals_full_batch_step(runs, arch):
    r = runs[0][arch]
    assert runs[0]["device_count"] == N_DEV
    assert r["params_rel_diff"] < TOL
    assert r["batch_stats_rel_diff"] < TOL  # BN statistics over the global batch, not per shard
    assert r["metrics_rel_diff"] < TOL
    assert r["x_shard_rows"] == [64 // N_DEV]  # really split: 8 examples per device
    assert r["all_reduces"] > 0
    assert r["param_sharding_replicated"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mlp", "convnet"])
def test_lemma24_norm_identity_with_all_reduced_gradient(runs, arch):
    """Lemma 2.4: ||w_{t+1}||^2 = ||w_t||^2 + lr_w^2 ||grad_w||^2, per group, for the sharded step's update
    against the full-batch gradient (relative to ||w_t||^2), and the step's own residual metric."""
    r = runs[0][arch]
    assert r["n_groups"] >= 3
    assert r["lemma24_rel_residual_independent"] < TOL
    # the in-step residual is absolute: round-off of ||w||^2 sums, far below the lr^2 ||g||^2 it checks
    assert r["lemma24_residual_in_step"] < TOL * max(1.0, r["lemma24_lhs_scale"])
    assert r["lemma24_lhs_scale"] > 1e-6  # the identity is not vacuous


@pytest.mark.slow
def test_indivisible_batch_is_refused(runs):
    msg = runs[0]["indivisible_error"]
    assert msg is not None and "12" in msg and "8 devices" in msg


@pytest.mark.slow
def test_two_process_distributed_equals_one_process(runs):
    _, params, meta = runs
    assert meta["dist0"]["process_count"] == 2 and meta["dist0"]["device_count"] == 2
    assert meta["dist0"]["local_device_count"] == 1
    assert meta["single"]["process_count"] == 1 and meta["single"]["device_count"] == 1
    ref = params["single"]
    for name in ("dist0", "dist1"):
        assert params[name].keys() == ref.keys()
        for k in ref:
            scale = max(np.max(np.abs(ref[k])), 1e-30)
            assert np.max(np.abs(params[name][k] - ref[k])) / scale < TOL, (name, k)
    # both processes hold the same replicated params, bit for bit
    for k in ref:
        np.testing.assert_array_equal(params["dist0"][k], params["dist1"][k])
    np.testing.assert_allclose(meta["dist0"]["losses"], meta["single"]["losses"], rtol=TOL)


@pytest.mark.slow
def test_every_process_hears_of_a_failure_and_receives_process_0s_tree(runs):
    meta = runs[2]
    assert meta["dist1"]["agreement"] == [["ValueError", "bad input  in\nprocess 1"], [7.0] * 3, 0]  # its own error
    assert meta["dist0"]["agreement"] == [["ParallelError", "process 1 of 2 stopped: bad input in process 1"],
                                          [7.0] * 3, 0]


def test_raise_if_any_failed_in_one_process():
    from rate_tuning import parallel

    parallel.raise_if_any_failed(None)
    with pytest.raises(KeyError, match="mine"):
        parallel.raise_if_any_failed(KeyError("mine"))
    tree = {"a": np.arange(3)}
    assert parallel.broadcast_from_first(tree) is tree


# In-process checks of the argument validation (one device is enough; nothing is initialised).


def test_distributed_initialize_validates_arguments():
    from rate_tuning import parallel

    bad = [("localhost", 2, 0, "host:port"), ("127.0.0.1:0", 2, 0, "port"), ("127.0.0.1:99999", 2, 0, "port"),
           ("127.0.0.1:1234", 0, 0, "num_processes"), ("127.0.0.1:1234", 2, 2, "process_id"),
           ("127.0.0.1:1234", 2, -1, "process_id"), ("127.0.0.1:1234", 2.0, 0, "num_processes"),
           (1234, 2, 0, "host:port")]
    for coordinator, n, i, word in bad:
        with pytest.raises(parallel.ParallelError, match=word):
            parallel.distributed_initialize(coordinator, n, i)


def test_mesh_and_batch_validation():
    import jax

    from rate_tuning import parallel

    mesh = parallel.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    assert parallel.data_mesh(1).size == 1
    for n in (0, jax.device_count() + 1):
        with pytest.raises(parallel.ParallelError, match="devices"):
            parallel.data_mesh(n)
    with pytest.raises(parallel.ParallelError, match="3 inputs but 2 labels"):
        parallel.shard_batch(mesh, np.zeros((3, 2)), np.zeros(2))
    x, y = parallel.shard_batch(mesh, np.ones((4, 2), np.float32), np.arange(4))
    assert x.shape == (4, 2) and x.sharding == parallel.batch_sharding(mesh)
    assert parallel.shard_batch(mesh, x, y)[0] is x  # already placed: no copy


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "8dev":
        worker_8dev(sys.argv[2])
    elif mode in ("dist", "single"):
        worker_dist(mode, int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")
