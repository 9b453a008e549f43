"""Data-parallel training over a mesh of devices (one host or many): the same step, placed on a mesh.

The step is :func:`rate_tuning.steps.make_train_step` unchanged. Data parallelism is a matter of where the
inputs live:

* the batch is sharded along the mesh axis ``'data'`` (each device holds ``B / n`` examples);
* the train state (params, optimizer state, BatchNorm running statistics, step) is replicated.

Under ``jax.jit`` the model's ``jnp.mean`` over the batch axis (:class:`rate_tuning.layers.BatchNorm`, and
the mean cross-entropy of :func:`rate_tuning.models.batch_loss`) is then a reduction over the **global**
batch: XLA's SPMD partitioner inserts the all-reduces, so the BatchNorm statistics, the loss, the gradient
and every metric of the step (among them Lemma 2.4's residual, computed from the all-reduced gradient) are
those of the full batch, to round-off. No ``axis_name``, ``pmean`` or ``shard_map`` is involved (the
``shard_map`` route needs the ``pmean`` on the loss, not on the gradients: see JAX-NOTES.md).

Multi-host: call :func:`distributed_initialize` first in every process (before any other JAX call); the
mesh then spans the devices of all processes. Every process must feed the same global batch (e.g.
``data.batch_at(x, y, B, seed, t)``, a pure function of the step); :func:`shard_batch` keeps only the
rows of the process's own devices. CPU processes talk through gloo (TCP).

Example::

    from rate_tuning import parallel, train
    setup = train.create_train_state(config, dataset, jax.random.key(0))
    mesh = parallel.data_mesh()                                   # all devices, axis 'data'
    state = parallel.replicate(mesh, setup.state)
    step = parallel.make_parallel_train_step(setup.model, setup.labels, setup.lr_w, mesh)
    for t in range(steps):
        x, y = data.batch_at(dataset.x_train, dataset.y_train, 1024, seed, t)
        state, metrics = step(state, x, y)                        # x, y: host arrays or shard_batch output
        jax.block_until_ready(metrics)                            # see JAX-NOTES.md (rendezvous hangs)
    params = parallel.to_host(state.params)                       # numpy, in every process

Paper: the step is the two-rate (S)GD of Lemma 2.4 (Arora, Li & Lyu, ICLR 2019) on the global batch.
"""
from __future__ import annotations

import re
import socket
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rate_tuning import steps

DATA_AXIS = "data"
"""Name of the mesh axis the batch is sharded along."""


class ParallelError(ValueError):
    """A mesh, batch or process setup that cannot run data-parallel (one-line message)."""


# ------------------------------------------------------------------------------------------------
# Mesh and placement.


def data_mesh(devices: Sequence[jax.Device] | int | None = None) -> Mesh:
    """A 1-D mesh with axis ``'data'`` over ``devices``.

    Args:
      devices: ``None`` (all devices of all processes, ``jax.devices()``), an int ``n`` (the first ``n`` of
        them; single-process only), or a sequence of devices.

    Built with ``jax.sharding.Mesh`` and not ``jax.make_mesh``, whose explicit-axes meshes break plain
    ``jit`` on sharded inputs (JAX-NOTES.md).
    """
    all_devices = jax.devices()
    if devices is None:
        devices = all_devices
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        n = int(devices)
        if not 1 <= n <= len(all_devices):
            raise ParallelError(f"asked for {n} devices but {len(all_devices)} are available "
                                f"({jax.default_backend()}; on CPU set XLA_FLAGS="
                                f"--xla_force_host_platform_device_count=N before importing jax)")
        if n < len(all_devices) and jax.process_count() > 1:
            raise ParallelError("a device count is single-process only: with several processes pass a list "
                                "of devices, or None for all of them")
        devices = all_devices[:n]
    devices = list(devices)
    if not devices:
        raise ParallelError("a mesh needs at least one device")
    if len({d.id for d in devices}) != len(devices):
        raise ParallelError(f"devices listed twice: {[d.id for d in devices]}")
    return Mesh(np.array(devices), (DATA_AXIS,))


MAX_VIRTUAL_CPU_DEVICES = 256
"""Most virtual CPU devices ``--devices`` may ask for (each costs memory and a thread pool; XLA's CPU
client grows without bound otherwise)."""


def check_device_count(devices: int | None, processes: int | None = None) -> int:
    """The number of devices a run uses: ``devices`` (single process; 1 when None), or every device of every
    process (several processes; ``devices`` must be None). :class:`ParallelError` (a ``ValueError``, one
    line) for anything else. With ``processes`` given (the CLI, before JAX's backend exists) no device is
    created."""
    processes = jax.process_count() if processes is None else processes
    if devices is None:
        return jax.device_count() if processes > 1 else 1
    if isinstance(devices, bool) or not isinstance(devices, (int, np.integer)) or devices < 1:
        raise ParallelError(f"devices must be a positive integer, got {devices!r}")
    if processes > 1:
        raise ParallelError(f"devices must be None with {processes} processes (the mesh spans all devices of "
                            f"all of them)")
    if devices > MAX_VIRTUAL_CPU_DEVICES:
        raise ParallelError(f"devices={devices} is more than the {MAX_VIRTUAL_CPU_DEVICES} a run may use")
    return int(devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split along ``'data'``, every other axis whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def _global_array(x, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same global value in every process) as a global array with ``sharding``: each process
    copies in only the slices of its own devices, so this works with one process or many."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable:  # one process: a plain copy (keeps weak types)
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)  # int64 -> int32 without x64
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_batch(mesh: Mesh, x, y) -> tuple[jax.Array, jax.Array]:
    """Place the global batch ``(x, y)`` on ``mesh``, split along its first axis over ``'data'``.

    Every process passes the same global batch; ``len(x)`` must be a multiple of the number of devices
    on the ``'data'`` axis (each device gets ``len(x) / n`` consecutive examples).

    Raises:
      ParallelError: mismatched lengths, or a batch that does not divide evenly over the devices.
    """
    n_dev = mesh.shape[DATA_AXIS]
    shape_x, shape_y = np.shape(x), np.shape(y)
    if not shape_x or not shape_y:
        raise ParallelError(f"a batch needs a leading batch axis; got shapes {shape_x} and {shape_y}")
    if shape_x[0] != shape_y[0]:
        raise ParallelError(f"batch has {shape_x[0]} inputs but {shape_y[0]} labels")
    if shape_x[0] % n_dev:
        lo = shape_x[0] // n_dev * n_dev
        hint = f"{lo} or {lo + n_dev}" if lo else f"{n_dev}"
        raise ParallelError(f"batch size {shape_x[0]} is not divisible by the {n_dev} devices of the "
                            f"'{DATA_AXIS}' axis (use a multiple of {n_dev}, e.g. {hint})")
    sharding = batch_sharding(mesh)
    return _global_array(x, sharding), _global_array(y, sharding)


def replicate(mesh: Mesh, tree):
    """Every array leaf of ``tree`` (e.g. a ``TrainState``) copied onto every device of ``mesh``.

    Non-array leaves (static fields such as ``apply_fn`` and ``tx`` of a ``TrainState`` are not leaves)
    pass through. With several processes, every process must pass the same values.
    """
    sharding = replicated_sharding(mesh)

    def place(leaf):
        if isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float)):
            return _global_array(leaf, sharding)
        return leaf

    return jax.tree_util.tree_map(place, tree)


def to_host(tree):
    """Numpy copies of the leaves of ``tree`` in every process: replicated arrays from the local copy,
    sharded ones gathered across processes (``multihost_utils.process_allgather``)."""
    def get(leaf):
        if not isinstance(leaf, jax.Array):
            return leaf
        if leaf.is_fully_addressable:
            return np.asarray(leaf)
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree_util.tree_map(get, tree)


# ------------------------------------------------------------------------------------------------
# The step.


def make_parallel_train_step(model, labels, lr_w, mesh: Mesh, *, max_traces: int | None = None,
                             check_finite: bool = False) -> Callable[[Any, Any, Any], tuple[Any, dict]]:
    """``step(state, x, y) -> (state, metrics)``: :func:`rate_tuning.steps.make_train_step` on ``mesh``.

    The function is the single-device step itself (unjitted), jitted once with explicit shardings: ``state``
    replicated, ``(x, y)`` sharded along ``'data'``, the new state and the metrics replicated. BatchNorm
    statistics, loss, gradient and metrics are those of the global batch (see the module docstring).

    ``state`` must already be on the mesh (:func:`replicate`, once, before the loop). ``x, y`` may be host
    arrays (placed with :func:`shard_batch` on every call) or :func:`shard_batch` output (no copy). The
    returned function carries ``.jitted`` (the sharded ``jax.jit`` object, e.g. for ``.lower``) and
    ``.mesh``.

    Args:
      model, labels, lr_w: as for :func:`rate_tuning.steps.make_train_step`.
      mesh: from :func:`data_mesh`.
      max_traces, check_finite: as for :func:`rate_tuning.steps.make_train_step` (a retrace raises; the
        ``finite`` flags of a diverging step).
    """
    inner = steps.make_train_step(model, labels, lr_w, max_traces=max_traces, check_finite=check_finite, jit=False)
    repl, data = replicated_sharding(mesh), batch_sharding(mesh)
    jitted = jax.jit(inner, in_shardings=(repl, data, data), out_shardings=(repl, repl), donate_argnums=())

    def parallel_train_step(state, x, y):
        x, y = shard_batch(mesh, x, y)
        return jitted(state, x, y)

    parallel_train_step.jitted = jitted
    parallel_train_step.mesh = mesh
    return parallel_train_step


# ------------------------------------------------------------------------------------------------
# Several processes.

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


def distributed_initialize(coordinator: str, num_processes: int, process_id: int, *,
                           local_device_ids: Sequence[int] | None = None,
                           initialization_timeout: int = 300) -> None:
    """``jax.distributed.initialize`` with its arguments checked first, for multi-host data parallelism.

    Call it in every process, before any other JAX call; afterwards ``jax.devices()`` (and so
    :func:`data_mesh`) lists the devices of all processes. On CPU the processes' collectives go through
    gloo (set here if the jaxlib default is none).

    Args:
      coordinator: ``'host:port'`` of process 0's coordination service (e.g. ``'10.0.0.1:1234'``;
        ``'127.0.0.1:PORT'`` for processes on one machine).
      num_processes: total number of processes, >= 1.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: restrict this process to these local devices (GPU), as in JAX.
      initialization_timeout: seconds to wait for every process to connect.

    JAX aborts the process (a fatal error, not an exception) when the coordination service cannot be
    reached or started, so the two failures that can be seen beforehand are reported here first: for
    process 0 a port already in use; for the others no coordinator listening within
    ``initialization_timeout`` seconds.

    Raises:
      ParallelError: a malformed address, a bad count or index, JAX already initialised, the port in use
        (process 0), or no coordinator within the timeout (the others).
    """
    if not isinstance(coordinator, str) or not _ADDRESS.match(coordinator):
        raise ParallelError(f"coordinator must be 'host:port', got {coordinator!r}")
    host, port = coordinator.rsplit(":", 1)
    host, port = host.strip("[]"), int(port)
    if not 0 < port < 65536:
        raise ParallelError(f"coordinator port must be in 1..65535, got {port}")
    for name, value, minimum in (("num_processes", num_processes, 1), ("process_id", process_id, 0),
                                 ("initialization_timeout", initialization_timeout, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ParallelError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if process_id >= num_processes:
        raise ParallelError(f"process_id must be in [0, {num_processes}), got {process_id}")
    from jax._src import distributed as _distributed  # no public "is initialized" yet
    if getattr(_distributed.global_state, "client", None) is not None:
        raise ParallelError("jax.distributed is already initialized in this process")
    if process_id == 0:
        _check_port_free(host, port)
    else:
        _wait_for_listener(host, port, initialization_timeout)
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num_processes),
                                   process_id=int(process_id), local_device_ids=local_device_ids,
                                   initialization_timeout=int(initialization_timeout))
    except RuntimeError as e:
        if "before" in str(e).lower():
            raise ParallelError("distributed_initialize must run before any JAX computation in the process "
                                f"({e})") from None
        raise


def distributed_shutdown() -> None:
    """``jax.distributed.shutdown()`` if this process joined a distributed run (its shutdown barrier), else
    nothing; for a process about to end without the interpreter's own clean-up."""
    from jax._src import distributed as _distributed  # no public "is initialized" yet
    if getattr(_distributed.global_state, "client", None) is not None:
        jax.distributed.shutdown()


def _check_port_free(host: str, port: int) -> None:
    """Process 0 serves the coordination service on ``port`` of every interface: is it free?"""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind(("", port))
        except OSError as e:
            raise ParallelError(f"process 0 cannot serve the coordinator on port {port}: {e.strerror}") from None


def _wait_for_listener(host: str, port: int, timeout: float) -> None:
    """Wait until something accepts TCP connections on ``host:port`` (process 0's coordination service)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ParallelError(f"no coordinator at {host}:{port} after {timeout} s ({e.strerror or e}; is "
                                    f"process 0 running with --coordinator {host}:{port}?)") from None
            time.sleep(0.2)


MESSAGE_BYTES = 1024
"""How much of a failing process's message :func:`raise_if_any_failed` passes to the others (UTF-8)."""


def raise_if_any_failed(error: BaseException | None) -> None:
    """Every process learns whether any process failed, and raises: the point where several processes
    agree that their inputs are good, before any of them writes anything.

    One process: raise ``error`` if it is not ``None``. Several: a collective (every process must call
    it, once, at the same point) exchanges each process's outcome; a process that failed raises its own
    ``error``, the others raise :class:`ParallelError` ``"process k of n stopped: <its message>"`` for the
    lowest failed ``k``. So no process is left waiting in a collective for one that has already exited.
    """
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    from jax.experimental import multihost_utils

    row = np.zeros(MESSAGE_BYTES + 1, np.uint8)
    if error is not None:
        text = " ".join(str(error).split()) or type(error).__name__
        raw = text.encode("utf-8")[:MESSAGE_BYTES]
        row[0], row[1:1 + len(raw)] = 1, np.frombuffer(raw, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(row))  # (processes, MESSAGE_BYTES + 1)
    if error is not None:
        raise error
    for k, other in enumerate(rows):
        if other[0]:
            message = bytes(other[1:]).rstrip(b"\0").decode("utf-8", errors="replace")
            raise ParallelError(f"process {k} of {len(rows)} stopped: {message}")


def broadcast_from_first(tree):
    """Process 0's ``tree`` in every process (numpy leaves); the other processes pass a tree of the same
    structure, shapes and dtypes (its values are ignored). One process: ``tree`` itself."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return to_host(multihost_utils.broadcast_one_to_all(tree))


__all__ = ["DATA_AXIS", "MESSAGE_BYTES", "ParallelError", "batch_sharding", "broadcast_from_first", "data_mesh",
           "distributed_initialize", "make_parallel_train_step", "raise_if_any_failed", "replicate",
           "replicated_sharding", "shard_batch", "to_host"]
