"""SGDP and AdamP as optax transformations (rate_tuning.projected): equal to the authors' ``adamp`` package
(PyTorch) in float64, the label-driven variant, and how often the cosine test agrees with the labels.

The parity tests need the optional ``adamp`` and ``torch`` packages (``pip install -e .[test]``); they are
skipped without them. The gradients are JAX's on both sides: at every step the gradient of the flax BN
network is computed in JAX at the JAX weights, and the same array is given to the torch parameters as
``.grad``; the two optimizers then step from the same weights. What is compared is the optimizers, not two
implementations of the network.
"""
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest

from rate_tuning import groups as G
from rate_tuning import projected as P
from tests.helpers import build

pytestmark = pytest.mark.usefixtures("x64")


def to_torch(x):
    """A flax array as a torch float64 tensor in torch's layout: kernels ``(in, out)`` -> ``(out, in)``,
    ``(kh, kw, in, out)`` -> ``(out, in, kh, kw)`` (the output channel first, where torch's rule looks)."""
    import torch

    x = np.asarray(x)
    if x.ndim == 2:
        x = x.T
    elif x.ndim == 4:
        x = x.transpose(3, 2, 0, 1)
    return torch.tensor(np.ascontiguousarray(x), dtype=torch.float64)


def from_torch(t, ndim):
    x = t.detach().numpy()
    return x.T if ndim == 2 else x.transpose(2, 3, 1, 0) if ndim == 4 else x


def ours(kind, kw, labels=None):
    kw = dict(kw)
    lr = kw.pop("lr")
    if kind == "sgdp":
        return P.sgdp(lr, labels=labels, **kw)
    b1, b2 = kw.pop("betas", (0.9, 0.999))
    return P.adamp(lr, b1, b2, labels=labels, **kw)


# -------------------------------------------------------------------------------------------------------
# parity with the adamp package
# -------------------------------------------------------------------------------------------------------

SGDP_MOMENTUM = ("sgdp", dict(lr=0.1, momentum=0.9, weight_decay=1e-2))
SGDP_NESTEROV = ("sgdp", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2))
SGDP_PLAIN = ("sgdp", dict(lr=0.1))
ADAMP = ("adamp", dict(lr=1e-2, weight_decay=1e-2))
ADAMP_NESTEROV = ("adamp", dict(lr=1e-2, nesterov=True, weight_decay=1e-2, betas=(0.8, 0.99)))

PARITY = [("mlp", "paper", *c) for c in (SGDP_MOMENTUM, SGDP_NESTEROV, SGDP_PLAIN, ADAMP, ADAMP_NESTEROV)] + \
         [("mlp", "no_bn", *SGDP_PLAIN), ("mlp", "no_bn", *ADAMP), ("convnet", "paper", *SGDP_NESTEROV),
          ("convnet", "paper", *ADAMP), ("convnet", "no_bn", *SGDP_MOMENTUM)]


def run_both(arch, preset, kind, kw, steps):
    """``steps`` steps of ours and of the package's optimizer on the same JAX gradients; the worst relative
    distance per leaf over all steps, and the set of decision codes seen."""
    pytest.importorskip("torch")
    adamp = pytest.importorskip("adamp")
    import torch

    _, params, loss = build(arch, preset)
    grad = jax.jit(jax.grad(loss))
    tx = ours(kind, kw)
    step = jax.jit(tx.update)
    state = tx.init(params)
    tparams = [torch.nn.Parameter(to_torch(x)) for x in jax.tree_util.tree_leaves(params)]
    ref = (adamp.SGDP if kind == "sgdp" else adamp.AdamP)(tparams, **kw)
    worst, codes = 0.0, set()
    for _ in range(steps):
        g = grad(params)
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
        for tp, leaf in zip(tparams, jax.tree_util.tree_leaves(g)):
            tp.grad = to_torch(leaf)
        ref.step()
        codes |= {int(c) for c in jax.tree_util.tree_leaves(state[0].projected)}
        for tp, leaf in zip(tparams, jax.tree_util.tree_leaves(params)):
            r = from_torch(tp, np.ndim(leaf))
            worst = max(worst, float(np.linalg.norm(np.asarray(leaf) - r) / np.linalg.norm(r)))
    return worst, codes


@pytest.mark.parametrize("arch, preset, kind, kw", PARITY)
def test_equal_to_the_adamp_package_over_50_steps(arch, preset, kind, kw):
    """50 steps from the same weights of a float64 BN network (and of its no-BN control): every leaf within a
    relative 1e-12 of the package's (measured: 2e-16 to 3e-15). The BN kernels are projected per channel at
    every step, the no-BN kernels are not (or, now and then, as a whole layer): both branches are compared."""
    worst, codes = run_both(arch, preset, kind, kw, 50)
    assert worst <= 1e-12, worst
    if preset == "paper":
        assert P.CHANNEL in codes  # projected kernels were compared
    else:
        assert P.NONE in codes


def test_rule_on_crafted_arrays_matches_the_package():
    """The three branches of the rule, one array each, against the package's own ``_projection``: a gradient
    orthogonal to every output channel (channel projection), orthogonal to the whole weight but not to its
    channels (layer projection), and a generic one (kept)."""
    pytest.importorskip("torch")
    adamp = pytest.importorskip("adamp")
    import torch

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4))          # flax layout: 6 inputs, 4 output channels
    p = rng.standard_normal((6, 4))
    g = rng.standard_normal((6, 4))
    per_channel = g - w * (np.sum(g * w, axis=0) / np.sum(w * w, axis=0))
    whole = g - w * (np.sum(g * w) / np.sum(w * w))
    opt = adamp.SGDP([torch.nn.Parameter(to_torch(w))], lr=0.1)
    for grad, code in ((per_channel, P.CHANNEL), (whole, P.LAYER), (g, P.NONE)):
        step, got = P.project_step(jnp.asarray(grad), jnp.asarray(w), jnp.asarray(p))
        ref, wd = opt._projection(to_torch(w), to_torch(grad), to_torch(p), 0.1, 0.1, 1e-8)
        assert int(got) == code
        assert (wd == 0.1) == (code != P.NONE)
        np.testing.assert_allclose(np.asarray(step), from_torch(ref, 2), rtol=1e-14, atol=1e-15)


# -------------------------------------------------------------------------------------------------------
# optax conventions
# -------------------------------------------------------------------------------------------------------


def test_states_are_namedtuples_and_compose_with_optax():
    rng = np.random.default_rng(0)
    params = {"kernel": jnp.asarray(rng.standard_normal((3, 4))), "bias": jnp.asarray(rng.standard_normal(4))}
    g = {"kernel": jnp.asarray(rng.standard_normal((3, 4))), "bias": jnp.asarray(rng.standard_normal(4))}
    for tx in (optax.chain(optax.clip_by_global_norm(1.0), P.sgdp(optax.cosine_decay_schedule(0.1, 10))),
               P.adamp(1e-3), optax.inject_hyperparams(P.adamp)(learning_rate=1e-3)):
        state = tx.init(params)
        upd, state = jax.jit(tx.update)(g, state, params)
        assert jax.tree_util.tree_structure(upd) == jax.tree_util.tree_structure(params)
    inner = P.scale_by_adamp().init(params)
    assert isinstance(inner, P.ScaleByAdamPState) and isinstance(inner, tuple)
    assert isinstance(P.scale_by_sgdp().init(params), P.ScaleBySGDPState)


@pytest.mark.parametrize("kwargs", [dict(momentum=1.0), dict(momentum=-0.1), dict(weight_decay=-1.0),
                                    dict(delta=float("nan")), dict(dampening=2.0)])
def test_bad_hyperparameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        P.sgdp(0.1, **kwargs)


def test_needs_params():
    tx = P.sgdp(0.1)
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))


# -------------------------------------------------------------------------------------------------------
# the label-driven variant
# -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgdp", "adamp"])
def test_label_driven_variant_projects_exactly_the_verified_groups(kind):
    """With labels confirmed by ``verify_labels``: every scale-invariant group's step (weight decay off) is
    tangent to the group, including the inner BN's ``(gamma, beta)`` that the cosine test never sees; the
    scale-variant last BN moves as with the unprojected optimizer; so the groups' norms change only at second
    order: ``||w + u||^2 - ||w||^2 = ||u||^2`` to round-off."""
    model, params, loss = build("mlp", "paper")
    labels = model.labels("layer")
    G.verify_labels(loss, params, labels)
    tx = ours(kind, dict(lr=0.05, momentum=0.9) if kind == "sgdp" else dict(lr=1e-2), labels=labels)
    plain = optax.sgd(0.05, momentum=0.9) if kind == "sgdp" else optax.adam(1e-2)
    state, pstate = tx.init(params), plain.init(params)

    @jax.jit
    def both(params, state, pstate):
        g = jax.grad(loss)(params)
        return tx.update(g, state, params), plain.update(g, pstate, params)

    for _ in range(20):
        (u, state), (pu, pstate) = both(params, state, pstate)
        dots = G.group_inner(u, params, labels)
        sq_u, sq_w = G.group_sq_norms(u, labels), G.group_sq_norms(params, labels)
        for k in dots:
            assert abs(float(dots[k])) <= 1e-13 * float(jnp.sqrt(sq_u[k] * sq_w[k])), k
        np.testing.assert_allclose(u["bn_out"]["scale"], pu["bn_out"]["scale"], rtol=1e-12)
        new = optax.apply_updates(params, u)
        sq_new = G.group_sq_norms(new, labels)
        for k in sq_new:
            assert abs(float(sq_new[k] - sq_w[k] - sq_u[k])) <= 1e-13 * float(sq_new[k]), k
        params = new
    codes = state[0].projected
    assert int(codes["bn0"]["scale"]) == P.LABEL and int(codes["bn_out"]["scale"]) == P.NONE


def test_label_driven_variant_leaves_frozen_leaves_alone():
    model, params, loss = build("mlp", "fully_si")
    labels = model.labels("channel")
    tx = P.sgdp(0.1, momentum=0.9, weight_decay=0.1, labels=labels)
    state = tx.init(params)
    u, _ = tx.update(jax.grad(loss)(params), state, params)
    assert not np.any(np.asarray(u["classifier"]["kernel"]))
    with pytest.raises(G.LabelError):
        P.adamp(1e-3, labels={"nope": G.si("x")}).init(params)


# -------------------------------------------------------------------------------------------------------
# the cosine test against the labels over training
# -------------------------------------------------------------------------------------------------------


def agreement_over_training(arch, preset, steps=100):
    """SGDP (the cosine test) for ``steps`` steps; :func:`P.label_agreement` summed over the steps."""
    model, params, loss = build(arch, preset)
    labels = model.labels("layer")
    tx = P.sgdp(0.1, momentum=0.9, weight_decay=1e-4)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        u, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, u), state

    total: dict = {}
    for _ in range(steps):
        params, state = step(params, state)
        for k, v in P.label_agreement(state[0].projected, labels).items():
            total[k] = total.get(k, 0) + v
    return total


def test_cosine_test_agrees_with_the_labels_on_bn_networks():
    """Over 100 SGDP steps: every kernel that feeds a BN (label 'si') is projected at every step and no
    other tested parameter is; the inner BN's ``(gamma, beta)`` group (label 'si', one-dimensional) is never
    tested. On the no-BN control no kernel is scale-invariant; the test's false positives there are counted
    (a random gradient has ``|cos| < 0.1 / sqrt(n)`` with probability ~0.08 per layer)."""
    paper = agreement_over_training("mlp", "paper")
    assert paper["tested_si_missed"] == 0 and paper["tested_other_projected"] == 0
    assert paper["tested_si_projected"] == 3 * 100 and paper["untested_si"] == 4 * 100
    control = agreement_over_training("mlp", "no_bn")
    assert control["tested_si_projected"] == control["tested_si_missed"] == 0
    assert control["tested_other_kept"] > 0.5 * (control["tested_other_kept"] + control["tested_other_projected"])
