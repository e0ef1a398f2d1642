"""Many networks in one compiled call: ``jax.vmap`` over parameter sets.

K members share the architecture and the training settings and differ in
their initial parameters and random streams (seeds), and optionally in their
training data: with ``bootstrap=True`` each member trains on its own
bootstrap resample of the training set (N rows drawn with replacement; the
bootstrap is one of the regularizers of docs/derivation.md#regularization).
The ensemble predicts with the average of the members' outputs.

Every epoch of all K members is ONE call of the vmapped epoch function, so
the members' matrix products run batched side by side instead of K Python
loops one after another.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from fnnet import core
from fnnet.network import MLP
from fnnet.train import (
    TrainConfig,
    epoch_key,
    init_state,
    make_optimizer,
    metric_name,
    run_epoch,
)
from fnnet.types import Array, Params


@dataclasses.dataclass
class EnsembleResult:
    params: Params  # every leaf has a leading axis of size K
    history: list[dict[str, float]]  # per epoch: mean train loss of each member
    train_seconds: float


def init_many(net: MLP, key: Array, k: int, dtype=jnp.float32) -> Params:
    """K independent initialisations, stacked on a leading axis."""
    keys = jax.random.split(key, k)
    return jax.tree.map(
        lambda *leaves: jnp.stack(leaves), *(net.init(q, dtype) for q in keys)
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=4)
def run_epoch_many(
    net, config, optimizer, shared_data, states, X, Y, member_keys, epoch
):
    """One epoch of every member in one call.

    Args:
      net, config, optimizer: as for :func:`fnnet.train.run_epoch` (static).
      shared_data: True when X, Y are one training set for all members;
        False when they carry a leading member axis (bootstrap resamples).
      states: stacked :class:`fnnet.train.TrainState`, leading axis K.
      X, Y: training arrays, (N, ...) or (K, N, ...).
      member_keys: (K,) base PRNG keys, one per member.
      epoch: the epoch number (1-based); member k uses
        ``epoch_key(member_keys[k], epoch)``, as a single run would.

    Returns:
      ``(states, losses, ok)`` with a leading member axis.
    """
    data_axis = None if shared_data else 0

    def one(state, x, y, key):
        return run_epoch(net, config, optimizer, state, x, y, epoch_key(key, epoch))

    return jax.vmap(one, in_axes=(0, data_axis, data_axis, 0))(
        states, X, Y, member_keys
    )


def fit_many(
    net: MLP,
    params: Params,
    train: tuple[Array, Array],
    config: TrainConfig,
    *,
    bootstrap: bool = False,
) -> EnsembleResult:
    """Train K members for ``config.epochs`` epochs, each epoch one compiled call.

    Args:
      net: the shared architecture.
      params: stacked initial parameters (see :func:`init_many`), leading K.
      train: (x, y) training arrays, as for :func:`fnnet.train.fit`.
      config: shared settings; member k's random stream is
        ``fold_in(key(config.seed), k)``. Early stopping is not applied here.
      bootstrap: train each member on its own bootstrap resample.

    Returns:
      The members' final parameters (stacked) and per-epoch training losses.
    """
    k = _members(params)
    member0 = jax.tree.map(lambda leaf: leaf[0], params)
    X, Y = core.prepare(net, member0, *net.validate(member0, *train, batch=True))
    member_keys = member_keys_for(config.seed, k)
    if bootstrap:
        X, Y = _resample(member_keys, X, Y)
    optimizer = make_optimizer(config)
    states = jax.vmap(lambda p: init_state(p, optimizer))(params)
    states = jax.tree.map(lambda t: jnp.array(t, copy=True), states)  # donated
    step_config = config.step_part()
    epoch_losses = []
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        states, losses, _ = run_epoch_many(
            net, step_config, optimizer, not bootstrap, states, X, Y, member_keys, epoch
        )
        epoch_losses.append(jnp.mean(losses, axis=1))
    jax.block_until_ready(states)
    seconds = time.perf_counter() - start
    history = [
        {"epoch": e, "batch_loss": [float(v) for v in losses]}
        for e, losses in enumerate(epoch_losses, start=1)
    ]
    return EnsembleResult(states.params, history, seconds)


@functools.partial(jax.jit, static_argnums=(0, 1))
def member_keys_for(seed: int, k: int) -> Array:
    """The (k,) base keys of the members: member i's is ``fold_in(key(seed), i)``."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(k))


@jax.jit
def _resample(member_keys, X, Y):
    """Each member's bootstrap resample: N rows drawn with replacement."""
    n = X.shape[0]
    rows = jax.vmap(lambda q: jax.random.randint(jax.random.fold_in(q, 0), (n,), 0, n))(
        member_keys
    )
    return X[rows], Y[rows]


def predict(net: MLP, params: Params, x: Array) -> Array:
    """The ensemble's prediction: the mean over members of yhat, shape of one yhat."""
    member0 = jax.tree.map(lambda leaf: leaf[0], params)
    x, _ = net.validate(member0, x)
    return jnp.mean(_member_outputs(net, params, x), axis=0)


@functools.partial(jax.jit, static_argnums=0)
def _member_outputs(net, params, x):
    """yhat of every member, stacked on a leading axis."""
    x = x.astype(params[0]["W"].dtype)
    return jax.vmap(lambda p: core.forward(net, p, x))(params)


def evaluate(net: MLP, params: Params, x: Array, y: Array) -> dict[str, float]:
    """Each member's metric, and the metric of the averaged prediction."""
    member0 = jax.tree.map(lambda leaf: leaf[0], params)
    X, Y = core.prepare(net, member0, *net.validate(member0, x, y))
    ensemble, members = _scores(net, params, X, Y)
    name = metric_name(net)
    return {
        f"ensemble_{name}": float(ensemble),
        f"member_{name}": [float(m) for m in members],
    }


@functools.partial(jax.jit, static_argnums=0)
def _scores(net, params, X, Y):
    per_member = _member_outputs(net, params, X)
    members = jax.vmap(lambda yhat: core.metric(net, yhat, Y))(per_member)
    return core.metric(net, jnp.mean(per_member, axis=0), Y), members


def _members(params: Params) -> int:
    sizes = {leaf.shape[0] for leaf in jax.tree.leaves(params)}
    if len(sizes) != 1:
        raise ValueError(
            f"params must share one leading member axis, got sizes {sizes}"
        )
    return sizes.pop()
