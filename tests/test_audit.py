"""rate_tuning.audit: the groups it finds on the presets (the hand-written label trees), on the models of
examples/audit_models.py (the groups derived by hand in docs/derivations.md), on synthetic losses with
known groups; the command line and ``python -m proofs_check --model`` on good and bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rate_tuning import audit as A
from rate_tuning import cli, groups as G, models, optim, targets
from tests.helpers import TINY, digits_batch

EXAMPLES = "examples/audit_models.py"
pytestmark = pytest.mark.usefixtures("compilation_cache")


def preset(arch, name, bn=None, **kw):
    x, y = digits_batch()
    model = models.build(arch, name, bn=bn, num_classes=10, **{**TINY[arch], **kw})
    return model, model.init(jax.random.key(0), x), (x, y)


def groups_of(params, labels):
    return {frozenset(p): pc for p, pc in A.group_membership(params, labels)["si"].items()}


# ---------------------------------------------------------------------------------------------------------
# presets: the hand-written label trees
# ---------------------------------------------------------------------------------------------------------

CASES = [("mlp", p) for p in models.PRESETS] + [(a, "paper") for a in ("convnet", "vgg")] + \
        [("convnet", "fully_si"), ("vgg", "smoothed"), ("vgg", "no_bn")]


@pytest.mark.parametrize("arch,name", [c if c[0] == "mlp" else pytest.param(*c, marks=pytest.mark.slow) for c in CASES])
def test_preset_labels_recovered_exactly(arch, name):
    model, variables, batch = preset(arch, name)
    frozen = ["classifier/kernel"] if name == "fully_si" else []
    result = A.audit(model, variables, batch, frozen=frozen)
    for grouping in ("layer", "channel"):
        assert result.labels(grouping) == model.labels(grouping), \
            A.compare_labels(variables["params"], result.labels(grouping), model.labels(grouping))
    assert not result.almost and not result.info["failed_joint_probe"]
    for g in result.groups:
        assert g.invariance <= g.tol_invariance and g.orthogonality <= g.tol_orthogonality
        assert 0 < g.tol_invariance < 1e-10 and 0 < g.tol_orthogonality < 1e-10


REST = [(a, p) for a in ("convnet", "vgg", "resnet") for p in models.PRESETS if (a, p) not in CASES]


@pytest.mark.slow
@pytest.mark.parametrize("arch,name", REST)
def test_preset_labels_recovered_on_every_other_architecture(arch, name):
    """The other architecture x preset pairs (the resnet paper preset: its own test below)."""
    if (arch, name) == ("resnet", "paper"):
        pytest.skip("the residual stream is refined: test_resnet_two_stages_refines_the_residual_stream")
    test_preset_labels_recovered_exactly(arch, name)


@pytest.mark.slow
def test_resnet_one_stage_recovered_exactly_up_to_names():
    model, variables, batch = preset("resnet", "paper", stage_channels=(4,))
    result = A.audit(model, variables, batch)
    for grouping in ("layer", "channel"):
        assert A.compare_labels(variables["params"], result.labels(grouping), model.labels(grouping)) == []
    stream = [g for g in result.groups if len(g.paths) == 4]
    assert [g.paths for g in stream] == [("block0_0_bn2/bias", "block0_0_bn2/scale", "stem_bn/bias", "stem_bn/scale")]


@pytest.mark.slow
def test_resnet_two_stages_refines_the_residual_stream():
    """The hand-written ``residual_stream`` group is scale-invariant but not minimal: a projection shortcut
    normalises the stream, so the BNs before it and those after it are two groups (derivations.md)."""
    model, variables, batch = preset("resnet", "paper")
    params = variables["params"]
    result = A.audit(model, variables, batch)
    found, hand = groups_of(params, result.labels("layer")), groups_of(params, model.labels("layer"))
    stream = frozenset(G.si_groups(params, model.labels("layer"))["residual_stream:affine"])
    parts = {frozenset({"stem_bn/bias", "stem_bn/scale", "block0_0_bn2/bias", "block0_0_bn2/scale"}),
             frozenset({"block1_0_bn2/bias", "block1_0_bn2/scale", "block1_0_proj_bn/bias", "block1_0_proj_bn/scale"})}
    assert set(found) == (set(hand) - {stream}) | parts and stream == frozenset().union(*parts)
    G.verify_labels(lambda p: models.batch_loss(model, p, variables["batch_stats"], *batch)[0],
                    params, result.labels("channel"))


@pytest.mark.slow
def test_standard_bn_is_almost_invariant_with_its_violation():
    model, variables, batch = preset("mlp", "paper", bn="standard")
    result = A.audit(model, variables, batch)
    assert result.groups == [] and result.labels("layer") == jax.tree_util.tree_map(
        lambda _: G.VARIANT_LABEL, model.labels("layer"), is_leaf=G.is_label)
    almost = {g.paths: g for g in result.almost}
    for kernel in ("layer0/kernel", "layer1/kernel", "classifier/kernel"):
        g = almost[(kernel,)]  # flax's BatchNorm keeps float32 statistics: the cosine is within its round-off
        assert g.orthogonality <= A.ALMOST and g.invariance > result.info["tol_invariance_sub_batch"]
    assert ("bn0/bias", "bn0/scale") in almost
    assert "almost" in result.table() and "layer0/kernel" in result.table()
    with_almost = result.labels("layer", include_almost=True)
    assert A.compare_labels(variables["params"], with_almost, model.labels("layer")) == []


@pytest.mark.slow
def test_audited_labels_train_with_two_rate_sgd_and_pass_verify_labels():
    model, variables, batch = preset("mlp", "paper")
    labels = A.audit(model, variables, batch).labels("channel")
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables["params"])
        loss = lambda p: models.batch_loss(model, p, variables["batch_stats"], jnp.asarray(batch[0], jnp.float64),
                                           batch[1])[0]
        assert set(G.verify_labels(loss, params, labels)) == set(G.si_groups(params, labels))
        tx = optim.two_rate_sgd(labels, 1.0, 0.1)
        updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
        assert jnp.all(updates["bn_out"]["scale"] != 0)


# ---------------------------------------------------------------------------------------------------------
# other models: the groups derived by hand
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def expected():
    return targets.import_module(EXAMPLES).EXPECTED


@pytest.mark.slow
@pytest.mark.parametrize("name", ["groupnorm_resnet", "transformer_pre_norm", "transformer_post_norm",
                                  "weightnorm_mlp", "nnx_batchnorm", "plain_mlp"])
def test_examples_match_the_hand_derived_groups(name, expected):
    result = A.audit_factory(f"{EXAMPLES}:{name}")
    want = expected[name]
    assert sorted(g.paths for g in result.groups) == sorted(tuple(sorted(s)) for s in want["si"])
    assert sorted(g.paths[0] for g in result.groups if g.per_channel) == sorted(want["channel"])
    assert not result.almost
    if name == "plain_mlp":
        assert result.groups == [] and all(l == G.VARIANT_LABEL for l in jax.tree_util.tree_leaves(
            result.labels(), is_leaf=G.is_label))


@pytest.mark.slow
def test_pre_and_post_norm_differ(expected):
    pre, post = expected["transformer_pre_norm"]["si"], expected["transformer_post_norm"]["si"]
    assert set(pre).isdisjoint(post) and "embed/embedding" in pre[0] and "ln1/scale" in post[0]


@pytest.mark.slow
@pytest.mark.parametrize("name,paths", [
    ("nnx_batchnorm_default_epsilon", {("l1/kernel",), ("l2/kernel",), ("bn1/bias", "bn1/scale")}),
    ("transformer_pre_norm_default_epsilon", {("attn/out/bias", "attn/out/kernel", "embed/embedding",
                                               "mlp_out/bias", "mlp_out/kernel", "pos")})])
def test_default_epsilons_are_almost_invariant(name, paths):
    result = A.audit_factory(f"{EXAMPLES}:{name}")
    assert result.groups == [] and {g.paths for g in result.almost} == paths
    assert all(g.invariance > result.info["tol_invariance_sub_batch"] for g in result.almost)


@pytest.mark.slow
def test_nnx_labels_drive_nnx_optimizer():
    from flax import nnx

    t = targets.load_factory(f"{EXAMPLES}:nnx_batchnorm")
    labels = A.audit_target(t).labels("channel")
    model, (x, y) = targets.import_module(EXAMPLES).nnx_batchnorm()
    opt = nnx.Optimizer(model, optim.two_rate_sgd(A.nnx_labels(labels), 1.0, 0.1), wrt=nnx.Param)
    before = float(jnp.sum(model.l1.kernel[...] ** 2))
    xent = lambda m: jnp.mean(jax.nn.logsumexp(m(x), -1) - jnp.take_along_axis(m(x), y[:, None], -1)[:, 0])  # noqa: E731
    grads = nnx.grad(xent)(model)
    opt.update(model, grads)
    assert float(jnp.sum(model.l1.kernel[...] ** 2)) >= before  # Lemma 2.4: an SI group only grows


def test_dict_factory_with_loss_call_kwargs_and_frozen():
    """The general factory form: a custom ``loss(outputs, batch)``, explicit ``call_kwargs``, ``frozen``."""
    model, variables, batch = preset("mlp", "fully_si")
    seen = {}

    def loss(out, b):
        seen["shape"] = out.shape
        return jnp.mean(jnp.sin(out))  # no targets needed

    t = targets.target({"model": model, "variables": variables, "batch": batch, "loss": loss,
                        "call_kwargs": {"train": True}, "frozen": ["classifier/kernel"]})
    result = A.audit_target(t)
    assert seen["shape"][-1] == 10 and result.frozen == ["classifier/kernel"]
    assert result.labels("channel") == model.labels("channel")
    with pytest.raises(targets.AuditError, match="expected \\(model, variables, batch\\)"):
        targets.target([model])
    with pytest.raises(targets.AuditError, match="needs its variables"):
        targets.target({"model": model, "batch": batch})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["groupnorm_resnet", "transformer_pre_norm", "transformer_post_norm",
                                  "weightnorm_mlp"])
def test_proofs_check_model_on_the_other_examples(name, tmp_path):
    from proofs_check import model_claims

    assert model_claims.main(f"{EXAMPLES}:{name}", out=str(tmp_path / "r"), quick=True) == 0
    records = [r for c in json.loads((tmp_path / "r" / "evidence.json").read_text())["claims"] for r in c["records"]]
    assert all(r["ok"] for r in records) and any(r["negative_control"] for r in records)


# ---------------------------------------------------------------------------------------------------------
# synthetic losses: joint groups, rescaling symmetries, no gradient
# ---------------------------------------------------------------------------------------------------------


def synthetic(n_pairs=6):
    """``L = sum_k f(a_k, b_k)``: ``(a_k, b_k)`` scale-invariant only jointly; ``u`` and ``v`` only enter as
    ``u * v`` (a rescaling symmetry, not scale invariance); ``z`` not at all; ``s`` alone is invariant."""
    rng = np.random.default_rng(0)
    params = {f"p{k}": {"a": rng.standard_normal(3), "b": rng.standard_normal(2)} for k in range(n_pairs)}
    params.update(u=rng.standard_normal(2), v=rng.standard_normal(2), z=rng.standard_normal(2),
                  s=rng.standard_normal((3, 4)))

    def loss(p, batch):
        total = jnp.sum(p["u"] * p["v"]) ** 2 + jnp.sum(p["s"] / jnp.linalg.norm(p["s"], axis=0) * batch)
        for k in range(n_pairs):
            q = jnp.concatenate([p[f"p{k}"]["a"], p[f"p{k}"]["b"]])
            total += jnp.sin(q[0] / jnp.linalg.norm(q) + k) + q[1] ** 2 / jnp.sum(q ** 2)
        return total

    return targets.Target(loss, params, rng.standard_normal((3, 4)))


def test_synthetic_joint_groups_and_symmetries():
    result = A.audit_target(synthetic())
    assert sorted(g.paths for g in result.groups) == sorted([(f"p{k}/a", f"p{k}/b") for k in range(6)] + [("s",)])
    assert [g.per_channel for g in result.groups if g.paths == ("s",)] == [True]
    assert set(result.variant) == {"u", "v", "z"}
    assert result.info["no_gradient"] == ["z"] and set(result.info["rescaling_symmetries"]) <= {"u", "v"}
    assert result.info["euler_rows"] >= 12 + 2 + 4  # enough rows for the leaves not invariant alone


def test_roundoff_budget_counts_rounding_equations_on_the_path():
    with jax.enable_x64(True):
        f32 = lambda w: w @ w  # noqa: E731
        assert targets.roundoff_budget(f32, jnp.ones(8, jnp.float32)) == 8 * 2.0 ** -24
        assert targets.roundoff_budget(f32, jnp.ones(8)) == 8 * 2.0 ** -53
        dead = lambda w: (w @ w, jnp.sum(w.astype(jnp.float32) * 3))[0]  # noqa: E731
        assert targets.roundoff_budget(dead, jnp.ones(8)) == 8 * 2.0 ** -53
        moves = lambda w: jnp.max(jnp.reshape(w, (2, 4)).T) + 0.0 * w[0]  # noqa: E731
        assert targets.roundoff_budget(moves, jnp.ones(8)) == 2 * 2.0 ** -53  # the add and the multiply


# ---------------------------------------------------------------------------------------------------------
# bad input: one line, exit status 2
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,message", [
    ("examples/nope.py:factory", "no file examples/nope.py"),
    ("examples.nope_module:factory", "cannot import examples.nope_module"),
    (f"{EXAMPLES}:missing", "has no callable 'missing'"),
    (f"{EXAMPLES}:raises", "raised RuntimeError: this factory fails on purpose"),
    (f"{EXAMPLES}:wrong_batch", "the model fails on the batch"),
    (f"{EXAMPLES}:no_params", "the model has no parameters"),
    ("no_colon", "expected MODULE:FACTORY"),
])
def test_cli_bad_input_is_one_line_and_exit_2(spec, message, capsys):
    assert cli.main(["audit", spec]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rate-tuning: error: ") and message in err


def test_cli_frozen_path_that_is_not_a_parameter(capsys):
    assert cli.main(["audit", f"{EXAMPLES}:plain_mlp", "--frozen", "nope/kernel"]) == 2
    assert "frozen path nope/kernel is not a parameter" in capsys.readouterr().err


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "audit.json"
    assert cli.main(["audit", f"{EXAMPLES}:weightnorm_mlp", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "3 scale-invariant group(s)" in table and "si/channel" in table
    data = json.loads(out.read_text())
    assert data["labels"]["channel"]["Dense_0/kernel"] == "si:Dense_0:kernel:channel"
    assert data["labels"]["layer"]["Dense_0/bias"] == "variant"


@pytest.mark.slow
def test_proofs_check_model_passes_and_controls_are_violated(tmp_path):
    from proofs_check import model_claims

    out = tmp_path / "report"
    assert model_claims.main(f"{EXAMPLES}:nnx_batchnorm", out=str(out), quick=True) == 0
    ev = json.loads((out / "evidence.json").read_text())
    claims = {c["id"]: c for c in ev["claims"]}
    assert set(claims) == {"C1", "C2", "C4", "C5", "C21", "I3"}
    records = [r for c in claims.values() for r in c["records"]]
    assert all(r["ok"] for r in records) and sum(r["negative_control"] for r in records) >= 9
    assert all(not r["passed"] for r in records if r["negative_control"])


@pytest.mark.slow
def test_proofs_check_model_command_line(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "proofs_check", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=300)
    bad = run("--model", f"{EXAMPLES}:raises", "--out", str(tmp_path / "r"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "fails on purpose" in bad.stderr
    wrong = run("--model", f"{EXAMPLES}:plain_mlp", "--claims", "C9")
    assert wrong.returncode == 2 and "does not apply to --model" in wrong.stderr
    empty = run("--model", f"{EXAMPLES}:plain_mlp", "--out", str(tmp_path / "r"))
    assert empty.returncode == 0 and "no claim applies" in empty.stdout and not (tmp_path / "r").exists()
