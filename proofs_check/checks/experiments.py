"""The App. D experiments, scaled to a CPU: robustness of BN training to lr_w (C22) and its loss under the
sphere-projected baseline (C23).

One small BN MLP (the ``paper`` preset of :mod:`rate_tuning.models`: exact train-mode BN with
``epsilon = 0``, ReLU; every kernel and the inner BN's ``(gamma, beta)`` scale-invariant on ``lr_w``; the
last BN's ``(gamma, beta)`` scale-variant on a fixed ``lr_g``) is trained with the paper's two-rate SGD
(:func:`rate_tuning.optim.two_rate_sgd`, constant rates, mini-batches without replacement) for every
``lr_w`` of a grid spanning six decades, all runs in one compiled program
(:func:`rate_tuning.sweep.run_sweep`). The data are Fashion-MNIST (the Debian package
``dataset-fashion-mnist``; a fixed subset of the first training images, in quick mode 2x2 average-pooled
to 14x14), or, when its files are absent, scikit-learn's digits; each record's setting names the dataset.
Training runs in float32 with x64 off, as users train (the claims are about training, not round-off).

*Training loss* is the mean over a fixed partition of the training subset into mini-batches of the
train-mode mini-batch loss (each batch normalised with its own statistics, as during training), at the
initial and at the final parameters; a run *trains* when ``final / initial <= FRACTION`` (= 1/2, stated
before running: at least half of the initial loss removed). A non-finite final loss (divergence) counts as
``final / initial = +inf``.

Paper: Arora, Li & Lyu, "Theoretical Analysis of Auto Rate-Tuning by Batch Normalization", ICLR 2019,
App. D (model: a modified VGG with every kernel and inner ``(gamma, beta)`` scale-invariant [S]; dataset
CIFAR-10 [R, medium]; lr_w swept over orders of magnitude at a fixed lr_g [R, low-medium]; the comparison
with a projected variant [R, low]; exact grid, batch size, epochs: [U]). The protocol here is the
project's: an MLP on Fashion-MNIST instead of a VGG on CIFAR-10, so that it runs in seconds.
"""
from __future__ import annotations

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np

from proofs_check.claims import claim
from proofs_check.curves import curve
from proofs_check.evidence import Evidence
from proofs_check.numerics import gamma, unit_roundoff, x64
from rate_tuning import data, models, sweep
from rate_tuning import groups as G

FRACTION = 0.5
"""A run trains when its final training loss is at most this fraction of the initial one."""

LR_GRID = (1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4)
"""lr_w grid of C22/C23: six decades (the paper's grid is [U]; PAPER §7 C22 names 1e-2 .. 1e2)."""

_QUICK = {"dataset": "fashion_mnist", "n": 2048, "pool": 2, "width": 32, "batch": 128, "steps": 640,
          "lr_w": LR_GRID, "lr_g": 0.1, "seeds": (0,)}
_FULL = {"dataset": "fashion_mnist", "n": 8192, "pool": 1, "width": 64, "batch": 128, "steps": 2560,
         "lr_w": LR_GRID, "lr_g": 0.1, "seeds": (0, 1)}
FALLBACK_N = 1024
"""Training images used when the fallback dataset (scikit-learn digits, 1437 training images) is used."""


# -------------------------------------------------------------------------------------------------------
# data and model
# -------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def load_data(dataset: str, n: int, pool: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``(x, y, description)``: ``n`` training images as standardised float32 vectors and their labels.

    Fashion-MNIST: the first ``n`` training images, ``pool x pool`` average-pooled. If its files are
    missing (:class:`rate_tuning.data.DataError`), scikit-learn digits (``min(n, FALLBACK_N)`` training
    images of the seed-0 split, 8x8, no pooling). Standardised per feature with the subset's statistics.
    """
    if dataset == "fashion_mnist":
        try:
            ds = data.fashion_mnist(limit_train=n, limit_test=1)
            x = ds.x_train
            if pool > 1:
                h = x.shape[1] // pool
                x = x[:, : h * pool, : h * pool].reshape(len(x), h, pool, h, pool, -1).mean(axis=(2, 4))
            side = x.shape[1]
            desc = (f"Fashion-MNIST (first {n} training images"
                    + (f", {pool}x{pool} average-pooled to {side}x{side}" if pool > 1 else ", 28x28") + ")")
        except data.DataError as err:
            ds = data.digits(seed=0)
            n = min(n, FALLBACK_N)
            x = ds.x_train[:n]
            desc = f"scikit-learn digits ({n} training images, 8x8; Fashion-MNIST unavailable: {err})"
    elif dataset == "digits":
        ds = data.digits(seed=0)
        n = min(n, len(ds.x_train))
        x = ds.x_train[:n]
        desc = f"scikit-learn digits ({n} training images, 8x8)"
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-6)
    return x.astype(np.float32), np.asarray(ds.y_train[: len(x)], np.int32), desc


def kernel_labels(model) -> dict:
    """Labels for ``no_bn`` that put every kernel on ``lr_w`` (one group per layer, as in ``paper``) and the
    biases on ``lr_g``: the same optimizer as the BN net, with the normalisation removed (so the ``'si'``
    labels are wrong on purpose: the control breaks scale invariance, nothing else)."""
    def relabel(path, label):
        name = G.path_str(path)
        return G.si(name.rsplit("/", 1)[0] + ":kernel") if name.endswith("kernel") else label

    return jax.tree_util.tree_map_with_path(relabel, model.labels("layer"), is_leaf=G.is_label)


@functools.lru_cache(maxsize=None)
def bn_mlp(preset: str, dataset: str, n: int, pool: int, width: int, batch: int, seeds: tuple, steps: int):
    """The MLP ``d -> width -> 10`` on the data: a namespace with ``loss_fn``, ``init_fn``, ``labels``,
    ``batch_fn``, ``train_loss``, ``batches_per_epoch``, ``dataset`` and ``model`` (descriptions).

    ``init_fn(key)``: kernels ``N(0, 1/fan_in)`` (LeCun-normal, as flax's default up to truncation), BN
    ``gamma = 1``, ``beta = 0``, biases 0; drawn with ``jax.random`` (compiling flax's init costs seconds).
    ``batch_fn``: :func:`rate_tuning.sweep.minibatch_fn`, the training loop's batch order for ``seeds``.
    ``train_loss(stacked_params)``: the training loss of every run (leading axis), see the module docstring.
    """
    x, y, desc = load_data(dataset, n, pool)
    model = models.build("mlp", preset, widths=(width,), num_classes=10, param_dtype=jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0), jnp.asarray(x[:batch]))
    stats = jax.tree_util.tree_map_with_path(
        lambda p, s: (np.ones if G.path_str(p).endswith("var") else np.zeros)(s.shape, s.dtype),
        shapes.get("batch_stats", {}))
    labels = model.labels("layer") if preset != "no_bn" else kernel_labels(model)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes["params"])
    names = [G.path_str(p) for p, _ in leaves]
    sizes = [math.prod(s.shape) if name.endswith("kernel") else 0 for name, (_, s) in zip(names, leaves)]
    offsets = np.cumsum([0] + sizes)

    def init_fn(key):
        z = jax.random.normal(key, (int(offsets[-1]),), jnp.float32)  # one draw: cheap to compile
        out = []
        for name, (_, s), lo, hi in zip(names, leaves, offsets[:-1], offsets[1:]):
            if name.endswith("kernel"):
                out.append(z[lo:hi].reshape(s.shape).astype(s.dtype) / math.sqrt(math.prod(s.shape[:-1])))
            else:
                out.append((jnp.ones if name.endswith("scale") else jnp.zeros)(s.shape, s.dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    template = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), shapes["params"])  # init_fn is ours
    prob = sweep.bn_problem(model, template, stats, x, y)
    nb = len(x) // batch
    xb = jnp.asarray(x[: nb * batch].reshape(nb, batch, -1))
    yb = jnp.asarray(y[: nb * batch].reshape(nb, batch))

    @jax.jit
    def train_loss(stacked):
        per_run = lambda p: jnp.mean(jax.vmap(lambda a, b: prob.loss_fn(p, (a, b)))(xb, yb))  # noqa: E731
        return jax.vmap(per_run)(stacked)

    bn = "exact (epsilon=0), train mode" if preset != "no_bn" else "none"
    mdesc = f"MLP {x.shape[1]}-{width}-10 ({preset} preset, BN {bn})"
    return types.SimpleNamespace(loss_fn=prob.loss_fn, init_fn=init_fn, labels=labels, first_batch=(xb[0], yb[0]),
                                 batch_fn=sweep.minibatch_fn(x, y, batch, seeds=seeds, steps=steps),
                                 train_loss=train_loss, batches_per_epoch=nb, n=len(x), dataset=desc, model=mdesc)


@functools.lru_cache(maxsize=None)
def mlp_sweep(preset: str, project: bool, dataset: str, n: int, pool: int, width: int, batch: int, steps: int,
              lr_w: tuple, lr_g: float, seeds: tuple, strategy: str = "auto") -> dict:
    """Train every ``(lr_w, seed)`` (one program) and return per-run ratios, losses and epoch-mean curves.

    Returns a dict with ``ratio`` (``(n_lr, n_seeds)``, final/initial training loss, ``inf`` when not
    finite), ``initial``, ``final``, ``diverged`` (first non-finite step, -1 if none), ``epoch_loss``
    (``(n_lr, n_seeds, epochs)``: the mean mini-batch loss of each epoch), ``dataset``, ``model``, ``n`` and
    ``strategy`` (as run). Float32, with x64 off, as users train.
    """
    g = sweep.grid(lr_w=lr_w, lr_g=[lr_g], seeds=list(seeds))
    with x64(False):
        m = bn_mlp(preset, dataset, n, pool, width, batch, seeds, steps)
        res = sweep.run_sweep(m.loss_fn, m.init_fn, m.labels, lr_w=g.lr_w, lr_g=g.lr_g, seeds=g.seeds, steps=steps,
                              project=project, batch_fn=m.batch_fn, record_every=1, return_params=True,
                              shape=g.shape, strategy=strategy)
        # the sweep's initial params: jax.jit caches on the function, so this reuses the sweep's compiled init
        inits = [jax.jit(m.init_fn)(jax.random.key(int(s))) for s in seeds]
        initial = np.asarray(m.train_loss(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *inits)), np.float64)
        initial = np.tile(initial, len(lr_w))                     # runs are lr_w-major, seeds innermost
        final = np.asarray(m.train_loss(res.final_params), np.float64)
    ratio = np.where(np.isfinite(final), final / initial, np.inf)
    nb = m.batches_per_epoch
    epochs = steps // nb
    ep = res.loss[:, : epochs * nb].reshape(len(g.lr_w), epochs, nb).mean(axis=2)
    shape = (len(lr_w), len(seeds))
    # Lemma 2.4 summed over the run, per SI group: ||w_T||^2 - ||w_0||^2 against lr_w^2 sum_t ||g_t||^2, with
    # ||g_t||^2 = (||grad_w F_t(V_t)||^2 recorded) / ||w_t||^2 and ||w_T||^2 from the raw final parameters
    final_sq = _raw_sq(res.final_params, m.labels)
    growth = {}
    for k in res.w_sq:
        w_sq = np.asarray(res.w_sq[k], np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):  # a diverged run: NaN, never compared
            g_sq = np.asarray(res.grad_sq_intrinsic_groups[k], np.float64) / w_sq
        lr = np.asarray(g.lr_w, np.float64)[:, None]
        growth[k] = {"measured": final_sq[k] - w_sq[:, 0], "predicted": np.sum(lr**2 * g_sq, axis=1),
                     "final": final_sq[k], "size": sum(int(np.size(leaf)) // len(g.lr_w) for _, leaf, lab in
                                                       G.flatten_labelled(res.final_params, m.labels)
                                                       if lab.kind == G.SI and lab.group == k)}
    return {"growth": growth,
            "ratio": ratio.reshape(shape), "initial": initial.reshape(shape), "final": final.reshape(shape),
            "diverged": res.diverged.reshape(shape), "epoch_loss": ep.reshape(shape + (epochs,)),
            "dataset": m.dataset, "model": m.model, "n": m.n, "strategy": res.strategy}


def _raw_sq(stacked, labels) -> dict[str, np.ndarray]:
    """``||w^(i)||^2`` per SI group of stacked params (leading run axis), numpy float64."""
    out: dict[str, np.ndarray] = {}
    for _, leaf, lab in G.flatten_labelled(stacked, labels):
        if lab.kind == G.SI:
            x = np.asarray(leaf, np.float64)
            out[lab.group] = out.get(lab.group, 0.0) + np.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)
    return out


def growth_records(claim_id: str, run: dict, s: dict, setting: str) -> list[Evidence]:
    """The swept ``lr_w`` reached the scale-invariant parameters: per ``lr_w`` (worst group and seed), the
    summed Lemma 2.4, ``(||w_T||^2 - ||w_0||^2) / (lr_w^2 sum_t ||g_t||^2) == 1``.

    Tolerance: each step's identity holds to ``tol_norm_identity(n) ||w_{t+1}||^2`` (float32, ``n`` the group
    size; C4's derivation), norms only grow, so the sum is within ``T tol ||w_T||^2``: relative to the
    prediction, ``T tol ||w_T||^2 / predicted``. Records only where that is below 1/2 (where the growth is
    large enough to be measured in float32), at least the largest ``lr_w``.
    """
    from proofs_check.numerics import tol_norm_identity
    lrs = tuple(s["lr_w"])
    n_seeds = len(s["seeds"])
    out = []
    for i, lr in enumerate(lrs):
        worst = None
        for k, gr in run["growth"].items():
            for j in range(n_seeds):
                r = i * n_seeds + j
                n = max(int(gr["size"]), 1)
                tol = s["steps"] * tol_norm_identity(n, "float32") * gr["final"][r] / max(gr["predicted"][r], 1e-300)
                ratio = gr["measured"][r] / gr["predicted"][r] if gr["predicted"][r] > 0 else math.inf
                cand = (abs(ratio - 1) / tol if tol > 0 else math.inf, ratio, tol, k, j)
                if worst is None or not cand[0] <= worst[0]:
                    worst = cand
        if worst[2] < 0.5 or i == len(lrs) - 1:
            out.append(Evidence(claim_id, f"{setting}, lr_w={lr:g}: (||w_T||^2 - ||w_0||^2) / (lr_w^2 sum_t "
                                          f"||g_t||^2) per SI group (Lemma 2.4 summed: lr_w reached the SI params)",
                                worst[1], 1.0, "==", worst[2], "float32", "exact",
                                details={"group": worst[3], "seed_index": worst[4],
                                         "tolerance_formula": "T tol_norm_identity(n, float32) ||w_T||^2 / predicted"}))
    return out


def label_records(claim_id: str, preset: str, s: dict) -> list[Evidence]:
    """:func:`rate_tuning.groups.verify_labels` accepts the preset's labels on the first mini-batch (float64,
    its own tolerance sqrt(eps)) and rejects a tree with the last BN's (gamma, beta) labelled 'si' (the
    control). Measured: the number of label errors (exact)."""
    m = bn_mlp(preset, s["dataset"], s["n"], s["pool"], s["width"], s["batch"], tuple(s["seeds"]), s["steps"])
    out = []
    with x64():
        p = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64),
                                   jax.device_get(jax.jit(m.init_fn)(jax.random.key(0))))
        xb, yb = jnp.asarray(np.asarray(m.first_batch[0]), jnp.float64), jnp.asarray(np.asarray(m.first_batch[1]))
        loss = lambda q: m.loss_fn(q, (xb, yb))  # noqa: E731
        wrong = jax.tree_util.tree_map_with_path(
            lambda path, lab: G.si("bn_out:affine") if G.path_str(path).startswith("bn_out/") else lab,
            m.labels, is_leaf=G.is_label)
        for labels, control in ((m.labels, None), (wrong, "the labels: bn_out's (gamma, beta) labelled 'si'")):
            try:
                G.verify_labels(loss, p, labels)
                n, msg = 0, ""
            except G.LabelError as exc:
                n, msg = 1, str(exc)[:300]
            what = "the preset's labels" if control is None else "bn_out's (gamma, beta) labelled 'si'"
            out.append(Evidence(claim_id, f"{m.model} on {m.dataset}, first mini-batch, float64: "
                                          f"rate_tuning.groups.verify_labels on {what} (label errors)", float(n), 0.0,
                                "<=", 0.5, "float64", "exact", negative_control=control is not None,
                                details={"message": msg, **({"breaks": control} if control else {})}))
    return out


def tol_ratio(n: int) -> float:
    """Round-off slack of ``final / initial`` relative to the ratio: each float32 training loss is a mean of
    ``n`` per-example cross-entropies (a sum of non-negative terms: ``gamma_n``), each computed to ~``10u``
    (log-sum-exp, the BN normalisation and one product of a width-``d`` vector: absorbed in ``gamma_n`` for
    ``n >= 1000``) -> ``2 (gamma_n + 10u)``, times the threshold."""
    return 2 * (gamma(n, "float32") + 10 * unit_roundoff("float32")) * FRACTION


def _setting(run: dict, opt: str, s: dict) -> str:
    return (f"{run['model']} on {run['dataset']}, {opt}, lr_g={s['lr_g']:g}, batch {s['batch']}, "
            f"{s['steps']} steps, seeds {list(s['seeds'])}, float32")


def _ratio_curve(runs: dict[str, dict], lrs) -> dict:
    """Final / initial training loss (worst seed) against lr_w, one series per run set (NaN where diverged)."""
    series = {name: np.where(np.isfinite(run["ratio"].max(axis=1)), run["ratio"].max(axis=1), np.nan)
              for name, run in runs.items()}
    return curve(np.asarray(lrs), series, "lr_w", "final / initial training loss (worst seed; "
                       "diverged runs not drawn)", logy=True, logx=True)


def _epoch_curve(run: dict, lrs) -> dict:
    """Mean mini-batch loss of each epoch (seed mean), one series per lr_w (none for a run that diverged in its
    first epoch)."""
    ep = run["epoch_loss"].mean(axis=1)
    series = {f"lr_w={lr:g}": np.where(np.isfinite(ep[i]), ep[i], np.nan) for i, lr in enumerate(lrs)
              if np.isfinite(ep[i]).any()}
    return curve(np.arange(1, ep.shape[1] + 1), series, "epoch", "mean mini-batch training loss",
                       logy=True)


def not_training(run: dict, tol: float) -> int:
    """Number of runs (lr_w x seeds) with ``final / initial > FRACTION + tol`` or a non-finite final loss."""
    return int(np.sum(~(run["ratio"] <= FRACTION + tol)))


def _run(s: dict, preset: str, project: bool) -> dict:
    return mlp_sweep(preset, project, s["dataset"], s["n"], s["pool"], s["width"], s["batch"], s["steps"],
                     tuple(s["lr_w"]), s["lr_g"], tuple(s["seeds"]), s.get("strategy", "auto"))


@claim(
    "C22",
    paper_ref="App. D experiments [R, high for the finding; protocol R, low-medium; grid U]",
    statement=f"two-rate SGD on a BN net trains for every lr_w of a six-decade grid (1e-2 .. 1e4) at a fixed lr_g: "
              f"final training loss <= {FRACTION:g} x initial for ALL lr_w (extremes slower)",
    hypotheses="scale-invariant kernels and inner (gamma, beta) (exact train-mode BN, paper preset), plain SGD, "
               "no weight decay or momentum; the last BN's (gamma, beta) on a fixed small lr_g",
    negative_controls=("normalisation: the no_bn MLP (biases, no BN) with every kernel on the same lr_w grid "
                       "diverges at large lr_w",
                       "the labels: verify_labels must reject the last BN's (gamma, beta) labelled 'si'"),
    quick=_QUICK,
    full=_FULL,
)
def check_c22(settings: dict) -> list[Evidence]:
    """Per ``lr_w``: the worst seed's ``final / initial <= 1/2`` (tolerance :func:`tol_ratio`); over the whole
    grid: the number of runs that do not train (ratio above 1/2, or a non-finite loss) ``<= 0``. The control
    is the same count for the same sweep of the ``no_bn`` MLP (a count, so that a diverged run gives a finite
    measured value).

    Setting (the paper's is [U]): Fashion-MNIST subset, MLP with one hidden layer, constant rates, the
    default LeCun-normal initialisation (so the initial effective lr of the hidden kernel is
    ``lr_w / ||W||^2 = lr_w / width``); the grid's extremes are the slowest (PAPER §6: "either large or
    small LR could substantially slow down the training").
    """
    s = settings
    paper = _run(s, "paper", False)
    no_bn = _run(s, "no_bn", False)
    lrs = tuple(s["lr_w"])
    tol = tol_ratio(paper["n"])
    out = []
    for i, lr in enumerate(lrs):
        r = paper["ratio"][i]
        out.append(Evidence("C22", _setting(paper, f"SGD lr_w={lr:g} constant", s) + ": final/initial training loss "
                            "(worst seed)", float(r.max()), FRACTION, "<=", tol, "float32", "exact",
                            details={"ratio_per_seed": r.tolist(), "initial": paper["initial"][i].tolist(),
                                     "final": paper["final"][i].tolist(), "dataset": paper["dataset"],
                                     "tolerance_formula": "2 (gamma_n + 10u) x 1/2 (float32)"}))
    curves = {"training loss per epoch, paper preset (seed mean)": _epoch_curve(paper, lrs),
              "final/initial training loss vs lr_w": _ratio_curve({"paper preset (BN)": paper,
                                                                    "no_bn (control)": no_bn}, lrs)}
    count = f"number of the {paper['ratio'].size} runs (lr_w x seeds) with final/initial > {FRACTION:g} or diverged"
    out.append(Evidence("C22", _setting(paper, f"SGD, every lr_w in {list(lrs)}", s) + ": " + count,
                        float(not_training(paper, tol)), 0.0, "<=", 0.0, "float32", "exact",
                        details={"ratio_per_lr": paper["ratio"].max(axis=1).tolist(), "lr_w": list(lrs),
                                 "dataset": paper["dataset"], "strategy": paper["strategy"], "curves": curves,
                                 "tolerance_formula": "a count (exact); each run's ratio compared with 1/2 + "
                                                      "tol_ratio"}))
    out += growth_records("C22", paper, s, _setting(paper, "SGD", s))
    out += label_records("C22", "paper", s)
    bad = [lrs[i] for i in range(len(lrs)) if not np.all(no_bn["ratio"][i] <= FRACTION + tol)]
    out.append(Evidence("C22", _setting(no_bn, f"SGD, every kernel on lr_w in {list(lrs)}", s) + ": " + count,
                        float(not_training(no_bn, tol)), 0.0, "<=", 0.0, "float32", "none", negative_control=True,
                        details={"breaks": "normalisation (no BN: the kernels are not scale-invariant)",
                                 "ratio_per_lr": no_bn["ratio"].max(axis=1).tolist(), "lr_w": list(lrs),
                                 "lr_w_not_training": bad,
                                 "diverged_at_step": no_bn["diverged"].tolist(), "dataset": no_bn["dataset"]}))
    return out


@claim(
    "C23",
    paper_ref="App. D, comparison with a projected variant [R, low]; protocol [U]",
    statement=f"the sphere-projected SGD (SI groups renormalised to their initial norm after every step: fixed "
              f"effective lr) loses the robustness: at large lr_w (>= 1e2) it does not train "
              f"(final/initial training loss > {FRACTION:g}, divergence counted as +inf), where plain SGD does",
    hypotheses="as C22, with project=True (rate_tuning.optim.two_rate_sgd); the paper's protocol for this "
               "comparison is [U]/[R, low]: setting and threshold are the project's",
    negative_controls=("the projection: plain (unprojected) SGD at the same large lr_w trains",),
    quick=dict(_QUICK, large=(1e2, 1e3, 1e4)),
    full=dict(_FULL, large=(1e2, 1e3, 1e4)),
)
def check_c23(settings: dict) -> list[Evidence]:
    """Per large ``lr_w``: the projected run's *best* seed has ``final / initial >= 1/2`` (``>=``: fails to train
    by C22's own criterion, divergence = +inf); control: the unprojected run (C22's) at the same ``lr_w``,
    whose *worst* seed must train, i.e. the same relation is violated.

    The projection keeps ``||w||`` at its initial value, so the effective lr stays ``lr_w / ||w_0||^2``
    instead of decaying after the first steps (Lemma 2.4): at ``lr_w >= 1e2`` that is ``>= 3`` for the hidden
    kernel (``||W_0||^2 ~ width``). Small ``lr_w`` train with or without projection (details of the records
    and the summary curve).
    """
    s = settings
    proj = _run(s, "paper", True)
    plain = _run(s, "paper", False)
    lrs = tuple(s["lr_w"])
    tol = tol_ratio(proj["n"])
    out = []
    curves = {"final/initial training loss vs lr_w": _ratio_curve({"SGD": plain, "projected SGD": proj}, lrs),
              "training loss per epoch, projected SGD (seed mean; a diverged run's line ends)": _epoch_curve(proj, lrs)}
    for lr in s["large"]:
        i = lrs.index(lr)
        r = proj["ratio"][i]
        out.append(Evidence("C23", _setting(proj, f"projected SGD lr_w={lr:g} constant", s)
                            + ": min over seeds of final/initial training loss (>= 1/2: fails to train; "
                              "diverged = inf)",
                            float(r.min()), FRACTION, ">=", tol, "float32", "exact",
                            details={"ratio_per_seed": r.tolist(), "diverged_at_step": proj["diverged"][i].tolist(),
                                     "projected_ratio_per_lr": proj["ratio"].max(axis=1).tolist(),
                                     "lr_w": list(lrs), "dataset": proj["dataset"],
                                     "protocol": "[U]/[R, low] in the paper; the project's setting",
                                     **({"curves": curves} if lr == s["large"][0] else {})}))
        r = plain["ratio"][i]
        out.append(Evidence("C23", _setting(plain, f"SGD (not projected) lr_w={lr:g} constant", s)
                            + ": max over seeds of final/initial training loss (>= 1/2 would mean it fails too)",
                            float(r.max()), FRACTION, ">=", tol, "float32", "exact", negative_control=True,
                            details={"breaks": "the projection (plain SGD: the norm grows and tunes the effective lr)",
                                     "ratio_per_seed": r.tolist(), "dataset": plain["dataset"]}))
    return out
