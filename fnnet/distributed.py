"""Several processes, one data-parallel run: ``jax.distributed``, each one's rows.

Users who outgrow one machine start the same program once per host (or once
per GPU). :func:`initialize` joins the processes into one JAX runtime; after
it, ``jax.devices()`` lists the devices of every process and
:func:`fnnet.train.fit` with ``devices`` splits each mini-batch over all of
them. Every process holds the data set on its host and computes the same
shuffle, but feeds its devices only the rows of each mini-batch that those
devices train on (:func:`global_batches`, after
``jax.make_array_from_process_local_data``); the parameters are replicated and
XLA all-reduces the gradient sums across processes. Only the primary process
(process 0, :func:`is_primary`) writes files.

Launching, for example with two processes on one machine::

    fnnet train --coordinator 127.0.0.1:29500 --num-processes 2 --process-id 0 &
    fnnet train --coordinator 127.0.0.1:29500 --num-processes 2 --process-id 1

Under SLURM (``srun``) or Open MPI (``mpirun``) the three values come from
the environment (see :func:`cluster_launch`).

When a process dies, JAX's coordination service notices the missing
heartbeats and ends the others with an error ("the JAX distributed service
detected fatal errors ... another task died") after ``heartbeat_timeout``
seconds, instead of letting them wait in a collective forever.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

__all__ = [
    "cluster_launch",
    "global_batches",
    "initialize",
    "is_primary",
    "local_copy",
    "mesh_devices",
    "process_rows",
    "replicate",
    "sync",
]


def cluster_launch() -> bool:
    """Whether this process was started as one of several by SLURM or Open MPI.

    True when the variables JAX's own cluster detection reads are set and
    name more than one process: ``srun`` (SLURM_JOB_ID, SLURM_STEP_NODELIST,
    SLURM_NTASKS > 1, SLURM_PROCID, SLURM_LOCALID) or ``mpirun``
    (OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE > 1). A single-task job is
    an ordinary run and starts no coordination service.
    """
    env = os.environ

    def many(name: str) -> bool:
        try:
            return int(env.get(name, "1")) > 1
        except ValueError:
            return False

    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm) and many("SLURM_NTASKS"):
        return True
    return "OMPI_MCA_orte_hnp_uri" in env and many("OMPI_COMM_WORLD_SIZE")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout: int | None = None,
    initialization_timeout: int | None = None,
    shutdown_timeout: int | None = None,
) -> None:
    """Join this process to the others: ``jax.distributed.initialize``, checked.

    Call it once, before anything else uses JAX. Give all three of
    ``coordinator``, ``num_processes`` and ``process_id``, or none of them:
    then JAX reads them from the cluster environment it recognises (SLURM,
    Open MPI, Cloud TPU, Kubernetes; see ``jax.distributed.initialize``).

    Args:
      coordinator: ``"HOST:PORT"`` of process 0, where it serves the
        coordination service; every process passes the same address.
      num_processes: how many processes take part (>= 1).
      process_id: this process's number, ``0 <= process_id < num_processes``.
      heartbeat_timeout: seconds without a heartbeat after which a process
        counts as dead and the others stop with an error (JAX's default:
        100).
      initialization_timeout: seconds to wait for every process to join
        (JAX's default: 300).
      shutdown_timeout: seconds a finished process waits for the others at
        exit (JAX's default: 300).

    Raises:
      ValueError: a malformed or partial set of arguments.
      RuntimeError: from JAX, when called twice or after JAX started.
    """
    given = {
        "coordinator": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    missing = [k for k, v in given.items() if v is None]
    if missing and len(missing) < 3:
        raise ValueError(
            "give coordinator, num_processes and process_id together (or none, to "
            f"read them from the cluster environment); missing: {', '.join(missing)}"
        )
    if coordinator is not None:
        host, sep, port = str(coordinator).rpartition(":")
        if (
            not isinstance(coordinator, str)
            or not sep
            or not host
            or not (port.isdigit() and 0 < int(port) < 65536)
        ):
            raise ValueError(
                f"coordinator must be 'HOST:PORT' with a port in 1..65535, got "
                f"{coordinator!r}"
            )
        _check_int("num_processes", num_processes, 1)
        _check_int("process_id", process_id, 0)
        if process_id >= num_processes:
            raise ValueError(
                f"process_id must be below num_processes={num_processes}, got "
                f"{process_id}"
            )
    timeouts = {
        "heartbeat_timeout_seconds": ("heartbeat_timeout", heartbeat_timeout),
        "initialization_timeout": ("initialization_timeout", initialization_timeout),
        "shutdown_timeout_seconds": ("shutdown_timeout", shutdown_timeout),
    }
    kwargs = {}
    for jax_name, (name, value) in timeouts.items():
        if value is not None:
            _check_int(name, value, 1)
            kwargs[jax_name] = value
    jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)


def is_primary() -> bool:
    """Whether this is process 0, the one that writes a run's files.

    True in an ordinary single-process run.
    """
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op alone)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_rows(sharding: NamedSharding, batch_size: int) -> slice:
    """The rows of each mini-batch that this process feeds.

    Args:
      sharding: the sharding of the (batches, batch_size, ...) mini-batches,
        splitting axis 1 over the devices of every process.
      batch_size: rows per mini-batch.

    Returns:
      A slice of ``range(batch_size)``: the block held by this process's
      devices.

    Raises:
      ValueError: this process's devices hold no block, or blocks that are
        not next to each other (a mesh that interleaves processes).
    """
    index_map = sharding.addressable_devices_indices_map((1, batch_size))
    spans = sorted({idx[1].indices(batch_size)[:2] for idx in index_map.values()})
    if not spans:
        raise ValueError("this process has no device in the mesh")
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        if stop != start:
            raise ValueError(
                f"the mesh gives process {jax.process_index()} the rows {spans} of "
                "each batch, not one block; order the mesh's devices by process"
            )
    return slice(spans[0][0], spans[-1][1])


def global_batches(
    sharding: NamedSharding, local: np.ndarray, batch_size: int
) -> jax.Array:
    """One global (batches, batch_size, ...) array from each process's rows.

    Args:
      sharding: as for :func:`process_rows`.
      local: this process's rows of every mini-batch, shape (batches, rows,
        ...) with the rows of ``process_rows(sharding, batch_size)``.
      batch_size: rows per mini-batch in the global array.

    Returns:
      A global array; its shards on this process's devices hold ``local``
      (``jax.make_array_from_process_local_data``). No process sends rows
      that other processes' devices train on.
    """
    shape = (local.shape[0], batch_size, *local.shape[2:])
    return jax.make_array_from_process_local_data(sharding, local, shape)


def replicate(tree, mesh) -> object:
    """Every leaf as a global array replicated over ``mesh``.

    The leaves must hold the same values in every process (the same
    initialisation, or the same checkpoint); each process places its own
    copy on its devices, nothing is sent between processes. (In jax 0.10.2
    ``jax.device_put`` onto such a sharding refuses arrays already committed
    to a device, and PRNG keys; this goes through the host.)
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def put(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = replicate(jax.random.key_data(leaf), mesh)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, replicated, lambda i: host[i])

    return jax.tree.map(put, tree)


def local_copy(tree) -> object:
    """Each replicated global leaf as an ordinary array on this process's first device.

    What functions that run in one process (evaluation, checkpoints, a
    caller's own code) take; the values are those every process holds.
    """

    def one(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                raise ValueError(
                    f"local_copy takes replicated arrays, got one sharded as "
                    f"{leaf.sharding}"
                )
            return jax.numpy.array(leaf.addressable_data(0), copy=True)
        return leaf

    return jax.tree.map(one, tree)


def mesh_devices(devices: int | Sequence[jax.Device] | None) -> list[jax.Device]:
    """The devices of a run over several processes: all of them, by process.

    Under several processes every device must take part (a process without
    one in the mesh could not feed its rows); ``devices`` may be None or the
    count of all devices.
    """
    every = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if devices is not None and devices != len(every):
        raise ValueError(
            f"devices must be None or {len(every)} (every device of the "
            f"{jax.process_count()} processes) in a run over several processes, "
            f"got {devices!r}"
        )
    return every
