"""Training: plain SGD, optax optimizers, regularization, early stopping.

One step is forward, backward, update. A whole epoch (shuffle, then every
mini-batch) is ONE compiled call: ``jax.lax.scan`` over the batches, so small
networks are not dominated by Python dispatch. The gradient comes from the
hand-written backward pass (``grad="hand"``, the default) or from ``jax.grad``
of the same cost (``grad="auto"``); nothing else changes between the two.

Regularization (docs/derivation.md#regularization):

* ``l2 = alpha``: J~ = J + (alpha/2) ||W||^2, hand gradient dJ~/dW = dJ/dW +
  alpha W (eq. 17).
* ``weight_decay = beta``: the decoupled update theta <- theta - beta theta + u,
  u the optimizer's update (eq. 18). With plain SGD (eq. 19), u = -lr
  dJ/dtheta and this equals the L2 update when beta = lr * alpha.
* Both leave biases alone unless ``decay_biases=True`` (biases do not add to
  the capacity that the penalty is meant to limit).
* ``MLP(keep_prob=p)``: inverted dropout in training steps only (eqs. 20, 21).
* ``noise_std = s``: Gaussian noise N(0, s^2) added to each training input.
* ``patience = k``: stop after k epochs without a better validation loss and
  return the best parameters.

Verification during training: ``fit(..., check_every=k)`` compares, every k
epochs, the hand gradient with ``jax.grad`` of the same cost on a fixed batch
and records the per-layer relative errors (eq. 23) in the history; see
:func:`grad_check_errors`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fnnet import backward as bw
from fnnet import checkpoint as ckpt
from fnnet import core, distributed, hostarray, privacy, shuffle
from fnnet.core import metric_name
from fnnet.errors import InputError
from fnnet.network import MLP
from fnnet.precision import CHECK_PRECISION
from fnnet.types import Array, Grads, Params

GRADS = ("hand", "auto")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "rmsprop")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run except the network and the data.

    Hashable Python values only, so it can be a static argument of ``jit``.
    The defaults are the only ones: ``fnnet train`` reads its flags' defaults
    from these fields, so ``fit`` with ``TrainConfig()`` trains as
    ``fnnet train`` does.

    Attributes:
      epochs: maximum number of epochs
      batch_size: mini-batch size
      learning_rate: the optimizer's step size
      optimizer: the update rule: ``"sgd"`` (plain SGD, eq. 19), ``"momentum"``,
        ``"nesterov"``, ``"adam"`` or ``"rmsprop"`` (optax's)
      momentum: momentum of ``"momentum"`` and ``"nesterov"``
      l2: L2 penalty alpha (eq. 17)
      weight_decay: decoupled weight decay beta, per step (eq. 18)
      decay_biases: apply ``l2`` and ``weight_decay`` to biases too
      noise_std: std of Gaussian noise added to training inputs
      patience: stop after this many epochs without a better validation loss
        and keep the best epoch's parameters; needs validation data; None
        (``--patience 0``): no early stopping
      grad: gradient source, ``"hand"`` or ``"auto"`` (``jax.grad``)
      seed: seeds shuffling, dropout and input noise
      dp_clip: DP-SGD's per-example gradient norm bound C (``dp_train_step``);
        None: DP-SGD off; inf: no clipping
      dp_noise: DP-SGD's noise multiplier sigma (noise std sigma C)
      dp_delta: the delta of the reported (epsilon, delta); None: none
        reported (``fnnet train --dp-clip`` picks one: see ``--dp-delta``)
    """

    epochs: int = 200
    batch_size: int = 32
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    l2: float = 0.0
    weight_decay: float = 0.0
    decay_biases: bool = False
    noise_std: float = 0.0
    patience: int | None = 20
    grad: str = "hand"
    seed: int = 0
    dp_clip: float | None = None
    dp_noise: float = 0.0
    dp_delta: float | None = None

    def __post_init__(self):
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

        positive_int("epochs")
        positive_int("batch_size")
        if self.patience is not None:
            positive_int("patience")
        for name in ("learning_rate", "momentum", "l2", "weight_decay", "noise_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number, got {v!r}")
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.learning_rate == 0:
            raise ValueError("learning_rate must be > 0, got 0.0")
        if self.weight_decay >= 1:
            raise ValueError(
                f"weight_decay is the fraction removed per step and must be < 1, "
                f"got {self.weight_decay}"
            )
        if self.grad not in GRADS:
            raise ValueError(f"grad must be one of {GRADS}, got {self.grad!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
            )
        self._check_dp()

    def _check_dp(self):
        clip, sigma, delta = self.dp_clip, self.dp_noise, self.dp_delta
        for name, v in (("dp_clip", clip), ("dp_noise", sigma), ("dp_delta", delta)):
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float))
            ):
                raise TypeError(f"{name} must be a number, got {v!r}")
        if clip is not None:
            if math.isnan(clip) or clip <= 0:
                raise ValueError(
                    f"dp_clip must be > 0 (inf: no clipping), got {clip!r}"
                )
            object.__setattr__(self, "dp_clip", float(clip))
            if self.grad != "hand":
                raise ValueError(
                    f"dp_clip needs grad='hand' (per-example norms come from the "
                    f"hand backward's rows), got grad={self.grad!r}"
                )
        if not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"dp_noise must be finite and >= 0, got {sigma!r}")
        object.__setattr__(self, "dp_noise", float(sigma))
        if sigma > 0 and (clip is None or math.isinf(clip)):
            raise ValueError(
                f"dp_noise={sigma} needs a finite dp_clip (the noise's standard "
                f"deviation is dp_noise * dp_clip), got dp_clip={clip!r}"
            )
        if delta is not None:
            if not 0 < delta < 1:
                raise ValueError(f"dp_delta must lie in (0, 1), got {delta!r}")
            if clip is None:
                raise ValueError("dp_delta needs dp_clip (DP-SGD is off without it)")
            object.__setattr__(self, "dp_delta", float(delta))

    def step_part(self) -> TrainConfig:
        """The settings a training step depends on (the key of its compilation).

        The number of epochs, the patience and the seed only steer the loop
        around the compiled epoch; leaving them out lets runs that differ in
        those alone share one compiled function.
        """
        return dataclasses.replace(self, epochs=1, patience=None, seed=0, dp_delta=None)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation | None:
    """The optax transformation named by ``config.optimizer``.

    ``"sgd"`` returns None: plain SGD is applied by hand, ``W <- W - lr dJ/dW``
    (eq. 19). Cached, so equal configs share one object and so
    one compiled epoch.
    """
    return _make_optimizer(config.step_part())


@functools.lru_cache(maxsize=64)
def _make_optimizer(config: TrainConfig) -> optax.GradientTransformation | None:
    lr, name = config.learning_rate, config.optimizer
    if name == "sgd":
        return None
    if name == "momentum":
        return optax.sgd(lr, momentum=config.momentum)
    if name == "nesterov":
        return optax.sgd(lr, momentum=config.momentum, nesterov=True)
    if name == "adam":
        return optax.adam(lr)
    return optax.rmsprop(lr)


class TrainState(NamedTuple):
    """What one step changes: the parameters and the optimizer state."""

    params: Params
    opt_state: Any


def init_state(
    params: Params, optimizer: optax.GradientTransformation | None
) -> TrainState:
    if optimizer is None:
        return TrainState(params, ())
    with jax.numpy_dtype_promotion("standard"):
        return TrainState(params, optimizer.init(params))


class Hyper(NamedTuple):
    """The continuous settings a step reads, as values that may be traced.

    A sweep (:mod:`fnnet.sweep`) trains members that differ in these inside
    one ``vmap``: each member's step reads its own values from a ``Hyper`` of
    scalar arrays, while the switches that shape the computation stay static
    in the population's :class:`TrainConfig` and :class:`MLP` (a penalty,
    decay or noise of 0 and a keep probability of 1 leave a member's numbers
    as a run without them would have them). ``hyper=None`` everywhere means
    "the values of the config and the network", unchanged.

    With an optax optimizer, ``learning_rate`` scales the updates of an
    optimizer built with learning rate 1 (see :func:`unit_rate_optimizer`):
    optax applies the rate last, as ``u * -lr``, so the product is the same.
    """

    learning_rate: Any
    l2: Any
    weight_decay: Any
    noise_std: Any
    keep_prob: Any


def unit_rate_optimizer(config: TrainConfig) -> optax.GradientTransformation | None:
    """``make_optimizer`` with learning rate 1, for :class:`Hyper` rates."""
    return make_optimizer(dataclasses.replace(config, learning_rate=1.0))


def _scalar(value, like: Array):
    """A :class:`Hyper` value in the dtype of ``like`` (as a Python float would be)."""
    return jnp.asarray(value).astype(like.dtype)


# --------------------------------------------------------------------- a step


def _decayed(path, config: TrainConfig) -> bool:
    """Whether the leaf at this key path is decayed: every W; b on request."""
    return path[-1].key == "W" or config.decay_biases


def _map_decayed(fn, tree, params: Params, config: TrainConfig):
    """fn(t, theta) on the decayed leaves of ``tree``, the others unchanged."""
    return jax.tree_util.tree_map_with_path(
        lambda path, t, theta: fn(t, theta) if _decayed(path, config) else t,
        tree,
        params,
    )


def l2_penalty(params: Params, config: TrainConfig, alpha=None) -> Array:
    """(alpha/2) ||theta||^2 over the decayed leaves (alpha: ``config.l2`` if None)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(jnp.sum(jnp.square(t)) for path, t in leaves if _decayed(path, config))
    if alpha is None:
        return 0.5 * config.l2 * total
    return 0.5 * _scalar(alpha, total) * total


def l2_grad(params: Params, grads: Grads, config: TrainConfig, alpha=None) -> Grads:
    """dJ~/dtheta = dJ/dtheta + alpha theta, on the decayed leaves."""
    if alpha is None:
        alpha = config.l2
        return _map_decayed(lambda g, theta: g + alpha * theta, grads, params, config)
    return _map_decayed(
        lambda g, theta: g + _scalar(alpha, theta) * theta, grads, params, config
    )


def training_inputs(net: MLP, config: TrainConfig, x: Array, key, hyper=None):
    """x with input noise, and the dropout masks, drawn from ``key`` (or None).

    ``hyper``: an optional :class:`Hyper` whose noise and keep probability
    replace the config's and the network's.
    """
    masks = None
    if key is not None:
        k_mask, k_noise = jax.random.split(key)
        if config.noise_std > 0:
            noise = jax.random.normal(k_noise, x.shape, x.dtype)
            std = config.noise_std if hyper is None else hyper.noise_std
            x = x + jnp.asarray(std, x.dtype) * noise
        if net.keep_prob < 1:
            if hyper is None:
                masks = core.masks_for(net, k_mask, x)
            else:
                masks = core.masks_for(net, k_mask, x, keep_prob=hyper.keep_prob)
    return x, masks


def loss_and_grads(net: MLP, config: TrainConfig, params, x, y, key, hyper=None):
    """J~ (with the L2 penalty) and its gradient, from the configured source.

    x and y are already prepared (parameters' dtype, y shaped); ``key`` drives
    dropout and input noise and may be None when neither is on. ``hyper``: an
    optional :class:`Hyper` whose noise, keep probability and L2 values
    replace the config's and the network's.
    """
    x, masks = training_inputs(net, config, x, key, hyper)
    alpha = None if hyper is None else hyper.l2
    if config.grad == "hand":
        J, grads, _, _ = core.backprop(net, params, x, y, masks)
        if config.l2 > 0:
            J = J + l2_penalty(params, config, alpha)
            grads = l2_grad(params, grads, config, alpha)
        return J, grads

    def J_tilde(p):
        J = core.cost(net, p, x, y, masks)
        return J + l2_penalty(p, config, alpha) if config.l2 > 0 else J

    return jax.value_and_grad(J_tilde)(params)


def apply_update(
    config: TrainConfig,
    optimizer: optax.GradientTransformation | None,
    state: TrainState,
    grads: Grads,
    hyper: Hyper | None = None,
) -> TrainState:
    """One update: plain SGD or the optax transformation, then weight decay.

    ``hyper``: optional :class:`Hyper` rate and decay replacing the config's;
    an optax ``optimizer`` must then have learning rate 1
    (:func:`unit_rate_optimizer`).
    """
    params, opt_state = state
    if optimizer is None:  # eq. 19: theta <- theta - lr dJ/dtheta
        if hyper is None:
            lr = config.learning_rate
            new = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        else:
            rate = hyper.learning_rate
            new = jax.tree.map(lambda p, g: p - _scalar(rate, g) * g, params, grads)
    else:
        # optax mixes Python floats with int32 step counts, which a process
        # that set jax_numpy_dtype_promotion="strict" would reject.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        if hyper is not None:  # u * -1 from the unit rate, then * lr: u * -lr
            rate = hyper.learning_rate
            updates = jax.tree.map(lambda u: u * _scalar(rate, u), updates)
        new = optax.apply_updates(params, updates)
    if config.weight_decay > 0:  # decoupled: theta <- theta - beta theta + u
        if hyper is None:
            beta = config.weight_decay
            new = _map_decayed(lambda t, theta: t - beta * theta, new, params, config)
        else:
            beta = hyper.weight_decay
            new = _map_decayed(
                lambda t, theta: t - _scalar(beta, theta) * theta, new, params, config
            )
    return TrainState(new, opt_state)


def train_step(net, config, optimizer, state: TrainState, x, y, key=None, hyper=None):
    """Forward, backward, update on one mini-batch. Returns (state, J~)."""
    J, grads = loss_and_grads(net, config, state.params, x, y, key, hyper)
    return apply_update(config, optimizer, state, grads, hyper), J


# --------------------------------------------------------------------- an epoch


def _needs_key(net: MLP, config: TrainConfig) -> bool:
    return net.keep_prob < 1 or config.noise_std > 0


def _all_finite(tree) -> Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(t)) for t in leaves]))


def run_epoch(
    net, config, optimizer, state: TrainState, X, Y, key, *, sharding=None, hyper=None
):
    """Shuffle with ``key`` and take one step per full mini-batch, in one scan.

    The last ``N mod batch_size`` examples of each shuffle are left out of
    that epoch (a different few every epoch). If any step produced a
    non-finite loss or parameters, the state from before the epoch is
    returned with ``ok = False``.

    Args:
      sharding: optional :func:`batch_sharding`: every mini-batch is split
        over its devices along the batch axis (data parallelism); parameters
        stay replicated and XLA reduces the gradient sums across devices.
      hyper: optional :class:`Hyper` values for this run's steps (a sweep's
        member); None: the config's and the network's.

    Returns:
      ``(state, losses, ok)``: losses of shape (batches,).
    """
    if config.dp_clip is not None:  # DP-SGD: Poisson-sampled batches
        return run_dp_epoch(net, config, optimizer, state, X, Y, key)
    n = X.shape[0]
    B = min(config.batch_size, n)
    nb = n // B
    _, k_steps = jax.random.split(key)
    # Only the indices are permuted; each step gathers its own B rows, so no
    # shuffled copy of the data is ever built (the batches are the same as
    # those of X[perm] cut into blocks of B).
    perm = epoch_permutation(key, n, B)
    keys = jax.random.split(k_steps, nb) if _needs_key(net, config) else None

    def body(st, batch):
        idx, k = batch
        # Unsigned indices known to be in bounds: a plain gather, with no
        # wrapping of negative indices and no out-of-bounds fill.
        x = X.at[idx].get(mode="promise_in_bounds")
        y = Y.at[idx].get(mode="promise_in_bounds")
        if sharding is not None:
            step_sharding = NamedSharding(sharding.mesh, PartitionSpec("batch"))
            x = jax.lax.with_sharding_constraint(x, step_sharding)
            y = jax.lax.with_sharding_constraint(y, step_sharding)
        return train_step(net, config, optimizer, st, x, y, k, hyper)

    new_state, batch_losses = jax.lax.scan(body, state, (perm, keys))
    ok = jnp.all(jnp.isfinite(batch_losses)) & _all_finite(new_state.params)
    kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    return kept, batch_losses, ok


# --------------------------------------------------------------------- DP-SGD
#
# Abadi et al. 2016, "Deep Learning with Differential Privacy". Every step
# draws a Poisson batch (each training example independently with
# probability q = B / N, B the batch size), clips each example's gradient
# g_i = dL_i/dtheta to norm C, sums, adds N(0, (sigma C)^2) to every
# coordinate of the sum, and divides by B, the expected batch size:
#
#     g~ = (sum_{i in batch} min(1, C / ||g_i||) g_i + sigma C xi) / B
#
# The clipped sum is eq. 27 (no per-example gradient is formed); the (eps,
# delta) spent is the Poisson-subsampled Gaussian mechanism composed over the
# steps taken (fnnet.privacy). An epoch is N // B such steps.

#: A Poisson batch is processed in chunks of the expected size B plus this
#: many standard deviations sqrt(B), padded with rows of weight 0; a larger
#: batch takes more chunks, so no example is ever dropped.
DP_CHUNK_SIGMAS = 2.0


def dp_chunk_rows(n: int, batch_size: int) -> int:
    """Rows per chunk of a Poisson batch: min(N, B + ceil(2 sqrt(B)))."""
    B = min(batch_size, n)
    return min(n, B + math.ceil(DP_CHUNK_SIGMAS * math.sqrt(B)))


def dp_batch_grads(net, config: TrainConfig, params, x, y, weights, key, B: int):
    """(1/B) sum_i w_i clip_C(g_i) over the rows of x, and sum_i w_i L_i.

    ``key`` drives dropout and input noise as in a plain step (may be None).
    With ``weights`` all 1, ``dp_clip=inf`` and B = the number of rows, the
    gradient is exactly that of :func:`loss_and_grads` (the same products).
    """
    x, masks = training_inputs(net, config, x, key)
    out = core.clipped_grads(
        net, params, x, y, config.dp_clip, masks, weights, scale=1.0 / B
    )
    w = weights.astype(out.losses.dtype)
    return out.grads, jnp.sum(w * out.losses)


def dp_noise(config: TrainConfig, grads: Grads, key: Array, B: int) -> Grads:
    """grads + N(0, (sigma C / B)^2) on every coordinate (none when sigma = 0)."""
    if config.dp_noise == 0:
        return grads
    std = config.dp_noise * config.dp_clip / B
    leaves, treedef = jax.tree.flatten(grads)
    # One draw for every coordinate, cut into the leaves (one random kernel).
    xi = jax.random.normal(key, (sum(t.size for t in leaves),), leaves[0].dtype)
    noisy, start = [], 0
    for t in leaves:
        part = xi[start : start + t.size].reshape(t.shape)
        noisy.append(t + jnp.asarray(std, t.dtype) * part)
        start += t.size
    return jax.tree.unflatten(treedef, noisy)


def dp_train_step(net, config, optimizer, state: TrainState, X, Y, key):
    """One DP-SGD step on a Poisson batch of the training set (X, Y).

    Returns ``(state, J)``, J the mean loss over the sampled examples (plus
    the L2 penalty), 0 for an empty batch. Everything random (the batch, the
    noise, dropout and input noise) comes from ``key``.
    """
    params = state.params
    n = X.shape[0]
    B = min(config.batch_size, n)
    cap = dp_chunk_rows(n, B)
    k_sample, k_noise, k_rows = jax.random.split(key, 3)
    # Poisson sampling: every example joins independently with probability
    # q = B / N. A stable sort puts the chosen ones first (the order inside a
    # batch does not matter to a sum); `count` of them, Binomial(N, q).
    chosen = jax.random.bernoulli(k_sample, B / n, (n,))
    count = jnp.sum(chosen, dtype=jnp.int32)
    perm = jnp.argsort(~chosen, stable=True)
    needs_key = _needs_key(net, config)

    def more(carry):
        return carry[0] * cap < count

    def chunk(carry):
        j, g_sum, loss_sum = carry
        pos = j * cap + jnp.arange(cap, dtype=jnp.int32)
        idx = perm[jnp.minimum(pos, n - 1)]
        k = jax.random.fold_in(k_rows, j) if needs_key else None
        g, L = dp_batch_grads(net, config, params, X[idx], Y[idx], pos < count, k, B)
        return j + 1, jax.tree.map(jnp.add, g_sum, g), loss_sum + L

    zeros = jax.tree.map(jnp.zeros_like, params)
    start = (jnp.zeros((), jnp.int32), zeros, jnp.zeros((), X.dtype))
    _, grads, loss_sum = jax.lax.while_loop(more, chunk, start)
    grads = dp_noise(config, grads, k_noise, B)
    J = loss_sum / jnp.maximum(count, 1).astype(loss_sum.dtype)
    if config.l2 > 0:  # data-independent: added after the noise
        J = J + l2_penalty(params, config)
        grads = l2_grad(params, grads, config)
    return apply_update(config, optimizer, state, grads), J


def run_dp_epoch(net, config, optimizer, state: TrainState, X, Y, key):
    """N // B DP-SGD steps (:func:`dp_train_step`) in one scan; as :func:`run_epoch`."""
    n = X.shape[0]
    steps = n // min(config.batch_size, n)

    def body(st, k):
        return dp_train_step(net, config, optimizer, st, X, Y, k)

    new_state, batch_losses = jax.lax.scan(body, state, jax.random.split(key, steps))
    ok = jnp.all(jnp.isfinite(batch_losses)) & _all_finite(new_state.params)
    kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    return kept, batch_losses, ok


def dp_accounting_record(config: TrainConfig, n: int, epochs: int) -> dict:
    """{"dp_epsilon": eps} after ``epochs`` epochs of DP-SGD on n examples.

    Empty unless the run adds noise (dp_noise > 0) and names its delta.
    """
    if config.dp_clip is None or config.dp_noise == 0 or config.dp_delta is None:
        return {}
    q, steps = privacy.poisson_schedule(n, config.batch_size)
    eps = privacy.epsilon(config.dp_noise, q, steps * epochs, config.dp_delta)
    return {"dp_epsilon": eps}


@functools.partial(
    jax.jit, static_argnums=(0, 1, 2), static_argnames="sharding", donate_argnums=3
)
def run_epoch_jit(net, config, optimizer, state, X, Y, key, *, sharding=None):
    """:func:`run_epoch` as one compiled call; ``state`` is donated.

    ``net``, ``config`` (use ``config.step_part()``) and ``optimizer`` are
    static; X and Y are prepared (see :func:`fnnet.core.prepare`).
    """
    return run_epoch(net, config, optimizer, state, X, Y, key, sharding=sharding)


def epoch_permutation(key: Array, n: int, batch_size: int) -> Array:
    """The rows of each mini-batch in the epoch of ``key``, as run_epoch draws.

    The first of ``jax.random.split(key)`` draws the order
    (:func:`fnnet.shuffle.permutation`), the second the steps' keys.

    Returns:
      (batches, B) uint32 row indices, ``B = min(batch_size, n)``,
      batches = n // B.
    """
    B = min(batch_size, n)
    k_perm, _ = jax.random.split(key)
    return shuffle.permutation(k_perm, n)[: (n // B) * B].reshape(n // B, B)


def run_batches(net, config, optimizer, state: TrainState, Xb, Yb, key):
    """:func:`run_epoch`'s steps on mini-batches that are already cut.

    ``Xb``, ``Yb``: (batches, B, ...), batch b holding the rows
    ``epoch_permutation(key, N, B)[b]``; ``key`` is the epoch's key, from
    which the steps draw the same dropout and noise keys as in
    :func:`run_epoch`, so the two give the same states. A run over several
    processes feeds each process's rows this way (see
    :mod:`fnnet.distributed`); the batches' sharding splits their axis 1.

    Returns:
      ``(state, losses, ok)`` as :func:`run_epoch`.
    """
    _, k_steps = jax.random.split(key)
    nb = Xb.shape[0]
    keys = jax.random.split(k_steps, nb) if _needs_key(net, config) else None

    def body(st, batch):
        x, y, k = batch
        return train_step(net, config, optimizer, st, x, y, k)

    new_state, batch_losses = jax.lax.scan(body, state, (Xb, Yb, keys))
    ok = jnp.all(jnp.isfinite(batch_losses)) & _all_finite(new_state.params)
    kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    return kept, batch_losses, ok


#: :func:`run_batches` as one compiled call; ``state`` is donated.
run_batches_jit = jax.jit(run_batches, static_argnums=(0, 1, 2), donate_argnums=3)


def _fed_epoch(net, config, optimizer, state, host, key, sharding, B):
    """One epoch of a run over several processes: this process feeds its rows."""
    X_host, Y_host = host
    perm = np.asarray(epoch_permutation(key, X_host.shape[0], B))
    mine = perm[:, distributed.process_rows(sharding, B)]
    Xb = distributed.global_batches(sharding, X_host[mine], B)
    Yb = distributed.global_batches(sharding, Y_host[mine], B)
    key = distributed.replicate(key, sharding.mesh)
    return run_batches_jit(net, config, optimizer, state, Xb, Yb, key)


def batch_sharding(devices: int | Sequence[jax.Device]) -> NamedSharding:
    """Data parallelism: split the batch axis of (batches, B, ...) over devices.

    Args:
      devices: how many of ``jax.devices()`` to use, or the devices themselves.

    Returns:
      A ``NamedSharding`` over a one-axis mesh named "batch", sharding axis 1.
    """
    if isinstance(devices, int):
        available = jax.devices()
        if isinstance(devices, bool) or not 1 <= devices <= len(available):
            raise InputError(
                f"devices must be between 1 and {len(available)} (the devices JAX "
                f"sees: {available[0].platform} x{len(available)}), got {devices}"
            )
        devices = available[:devices]
    mesh = Mesh(np.array(devices), ("batch",))
    return NamedSharding(mesh, PartitionSpec(None, "batch"))


def epoch_key(base_key: Array, epoch: int) -> Array:
    """The key of epoch ``epoch`` (1-based): the same whether or not a run resumed."""
    return jax.random.fold_in(base_key, epoch)


# ------------------------------------------------------------------- evaluation


_evaluate = jax.jit(core.evaluate, static_argnums=0)


def evaluate(net: MLP, params: Params, x, y) -> dict[str, float]:
    """The cost J and the metric (accuracy, or R^2 averaged over targets)."""
    x, y = net.validate(params, x, y)
    X, Y = core.prepare(net, params, x, y)
    check_finite_data("", X, Y)
    return _evaluation_record(net, params, X, Y)


def _evaluation_record(net, params, X, Y) -> dict[str, float]:
    J, m = _evaluate(net, params, X, Y)
    return {"loss": float(J), metric_name(net): float(m)}


#: Rows per evaluation call: larger arrays are evaluated in slices of this
#: many rows (see :func:`evaluate_chunks`), so evaluating a big training set
#: never holds its hidden activations all at once.
EVAL_ROWS = 65536


@functools.partial(jax.jit, static_argnums=0)
def _evaluation_parts(net, params, X, Y):
    """What :func:`evaluate_chunks` merges: the loss, and the metric's parts."""
    trace = core.forward_cache(net, params, X)
    J, yhat = core.mean_loss(net, trace, Y), trace.z[-1]
    if metric_name(net) == "accuracy":
        return J, core.metric(net, yhat, Y)
    mean = jnp.mean(Y, axis=0)
    m2 = jnp.sum(jnp.square(Y - mean[None]), axis=0)
    return J, (jnp.sum(jnp.square(Y - yhat), axis=0), mean, m2)


def evaluate_chunks(net: MLP, params: Params, chunks) -> dict[str, float]:
    """:func:`evaluate` over data given in chunks, merged exactly.

    The cost J and the accuracy are means over all rows (chunk means weighted
    by their rows); R^2 merges each chunk's residual sum of squares and its
    targets' mean and squared deviations (Chan et al.'s update, float64), so
    nothing depends on how the rows were cut. One chunk gives exactly
    :func:`evaluate`'s numbers; several agree with it up to rounding.

    Args:
      net: the network.
      params: its parameters.
      chunks: an iterable of (x, y) pairs, each checked like
        :func:`evaluate`'s arguments (empty chunks are skipped).

    Returns:
      ``{"loss": J, metric: value}`` as :func:`evaluate`.
    """
    metric = metric_name(net)
    parts, first = [], None  # the first chunk waits: alone, it is evaluate's case

    def add(X, Y):
        parts.append((X.shape[0], jax.device_get(_evaluation_parts(net, params, X, Y))))

    for x, y in chunks:
        if len(x) == 0:
            continue
        X, Y = to_device(net, params, *net.validate(params, x, y, batch=True))
        del x, y
        if first is None and not parts:
            first = (X, Y)
            continue
        if first is not None:
            add(*first)
            first = None
        add(X, Y)
        del X, Y
    if first is not None:
        return _evaluation_record(net, params, *first)
    if not parts:
        raise ValueError("evaluate_chunks needs at least one row; got no chunks")
    return _merged_evaluation(metric, parts)


def _merged_evaluation(metric: str, parts) -> dict[str, float]:
    """One record from (rows, evaluation parts) pairs; see :func:`evaluate_chunks`."""
    n = sum(k for k, _ in parts)
    loss = sum(k * float(J) for k, (J, _) in parts) / n
    if metric == "accuracy":
        value = sum(k * float(m) for k, (_, m) in parts) / n
        return {"loss": loss, metric: value}
    ss_res, count, mean, m2 = 0.0, 0, 0.0, 0.0
    for k, (_, (res, mb, m2b)) in parts:
        mb, m2b = np.asarray(mb, np.float64), np.asarray(m2b, np.float64)
        ss_res = ss_res + np.asarray(res, np.float64)
        total = count + k
        delta = mb - mean
        mean = mean + delta * (k / total)
        m2 = m2 + m2b + np.square(delta) * (count * k / total)
        count = total
    return {"loss": loss, metric: float(np.mean(1.0 - ss_res / m2))}


@functools.partial(jax.jit, static_argnums=(0, 5))
def _slice_parts(net, params, X, Y, start, rows):
    """:func:`_evaluation_parts` of rows start:start + rows, sliced in the call."""
    x = jax.lax.dynamic_slice_in_dim(X, start, rows)
    y = jax.lax.dynamic_slice_in_dim(Y, start, rows)
    return _evaluation_parts(net, params, x, y)


def _evaluate_prepared(net, params, X, Y) -> dict[str, float]:
    """The evaluation record of prepared arrays, ``EVAL_ROWS`` rows per call.

    Up to ``EVAL_ROWS`` rows: :func:`evaluate`'s numbers exactly. Beyond, the
    slices are cut inside the compiled calls (no sliced copies) and merged
    as :func:`evaluate_chunks` merges chunks.
    """
    n = X.shape[0]
    if n <= EVAL_ROWS:
        return _evaluation_record(net, params, X, Y)
    parts = []
    for start in range(0, n, EVAL_ROWS):
        rows = min(EVAL_ROWS, n - start)
        got = _slice_parts(net, params, X, Y, start, rows)
        parts.append((rows, jax.device_get(got)))
    return _merged_evaluation(metric_name(net), parts)


def to_device(net: MLP, params: Params, x, y):
    """Checked (x, y) as device arrays in the parameters' dtype, copied once.

    ``jax.device_put`` copies host data at most once; ``jnp.asarray`` of a
    NumPy array would hold a second temporary copy. On the CPU backend an
    aligned host array (:mod:`fnnet.hostarray`) is not copied at all: the
    device array uses its memory. Host arrays in another dtype are converted
    on the host into aligned memory, so the device never holds both dtypes.
    """
    dtype = params[0]["W"].dtype
    if isinstance(x, np.ndarray) and x.dtype != dtype:
        x = hostarray.array(x, dtype)
    if isinstance(y, np.ndarray) and y.dtype.kind == "f" and y.dtype != dtype:
        y = hostarray.array(y, dtype)
    return core.prepare(net, params, *jax.device_put((x, y)))


# ------------------------------------------------- verification during training

#: Rows of the training set (the first ones) that the gradient check uses.
GRAD_CHECK_ROWS = 256
#: Prefix of the history keys of the gradient check.
GRAD_CHECK_PREFIX = "grad_rel_err_"


@functools.partial(jax.jit, static_argnums=0)
def grad_check_errors(net: MLP, params: Params, x: Array, y: Array) -> Array:
    """Per-layer relative error between the hand gradient and ``jax.grad``.

    Compares :func:`fnnet.core.backprop` with ``jax.grad`` of
    :func:`fnnet.core.cost` at ``params``, in evaluation mode: no dropout, no
    input noise and no L2 penalty (those are the training step's additions to
    the same cost, checked separately), with every matrix product at
    precision "highest" (:data:`fnnet.precision.CHECK_PRECISION`). The
    error of layer l is eq. 23,
    ``||u - v|| / max(||u||, ||v||)`` (0 when both are 0), over all of that
    layer's leaves together (W, b and a hidden block's parameters), computed
    on the device in the parameters' dtype: the same number as
    :func:`fnnet.relative_error` of the concatenated leaves, up to rounding.

    One compiled function per network and batch shape (``net`` is static).

    Args:
      net: the network.
      params: its parameters.
      x, y: a prepared batch (see :func:`fnnet.core.prepare`).

    Returns:
      An array of shape (L,): the error of layers 1..L.
    """
    # At "highest" precision whatever the network trains with: on an NVIDIA
    # GPU a float32 comparison at TF32 would measure TF32's rounding.
    net = dataclasses.replace(net, precision=CHECK_PRECISION)
    hand = core.backprop(net, params, x, y).grads
    auto = jax.grad(lambda p: core.cost(net, p, x, y))(params)
    errors = []
    for h_layer, a_layer in zip(hand, auto, strict=True):
        us, vs = jax.tree.leaves(h_layer), jax.tree.leaves(a_layer)
        # Scale by the largest entry first, so the squares neither overflow
        # nor underflow.
        big = jnp.max(jnp.stack([jnp.max(jnp.abs(t)) for t in us + vs]))
        safe = jnp.where(big > 0, big, jnp.ones_like(big))

        def sq(ts, safe=safe):
            return sum(jnp.sum(jnp.square(t / safe)) for t in ts)

        diff = sq([u - v for u, v in zip(us, vs, strict=True)])
        scale = jnp.maximum(sq(us), sq(vs))
        errors.append(jnp.where(big > 0, jnp.sqrt(diff / scale), jnp.zeros_like(big)))
    return jnp.stack(errors)


def grad_check_columns(net: MLP) -> list[str]:
    """The history keys a gradient check adds, layer 1..L, then the maximum."""
    layers = [f"{GRAD_CHECK_PREFIX}layer{l}" for l in range(1, net.num_layers + 1)]
    return [*layers, f"{GRAD_CHECK_PREFIX}max"]


def grad_check_record(net: MLP, params: Params, x: Array, y: Array) -> dict:
    """:func:`grad_check_errors` as history entries (one fetch from the device)."""
    errors = np.asarray(grad_check_errors(net, params, x, y))
    values = [*errors.tolist(), float(np.max(errors))]  # max: a NaN stays NaN
    return dict(zip(grad_check_columns(net), values, strict=True))


def grad_check_summary(history: list[dict[str, float]]) -> dict:
    """What the checks of a run found, for its metrics.

    Returns ``{"grad_check_max_rel_err": the largest per-layer error of every
    check (None without checks), "grad_check_epochs": the checked epochs}``.
    """
    key = f"{GRAD_CHECK_PREFIX}max"
    checked = [r for r in history if r.get(key) is not None]
    worst = float(np.max([r[key] for r in checked])) if checked else None
    return {
        "grad_check_max_rel_err": worst,
        "grad_check_epochs": [r["epoch"] for r in checked],
    }


# ------------------------------------------------------- gradient noise scale

#: History keys of :func:`noise_scale`.
NOISE_SCALE_KEYS = ("noise_scale", "noise_trace", "noise_grad_sq")


@functools.partial(jax.jit, static_argnums=(0, 4))
def noise_scale_terms(net: MLP, params: Params, X: Array, Y: Array, batch_size: int):
    """(B_simple, tr(Sigma), |G|^2) estimated on the training set (eq. 28).

    The first N // B batches of B rows (in order, evaluation mode) each give
    unbiased estimates of tr(Sigma) and |G|^2 from the per-example norms and
    the batch gradient (:func:`fnnet.core.noise_scale_estimates`); both are
    averaged over the batches before their ratio is taken (McCandlish et al.
    2018, Appendix A).
    """
    n = X.shape[0]
    B = min(batch_size, n)
    nb = n // B
    Xb = X[: nb * B].reshape(nb, B, *X.shape[1:])
    Yb = Y[: nb * B].reshape(nb, B, *Y.shape[1:])

    def one(carry, batch):
        out = core.per_example_norms(net, params, *batch)
        return carry, core.noise_scale_estimates(out.norms, out.grads)

    _, (trace, grad_sq) = jax.lax.scan(one, None, (Xb, Yb))
    trace, grad_sq = jnp.mean(trace), jnp.mean(grad_sq)
    return jnp.stack([trace / grad_sq, trace, grad_sq])


def noise_scale(net: MLP, params: Params, X, Y, batch_size: int) -> dict:
    """:func:`noise_scale_terms` as history entries ``NOISE_SCALE_KEYS``."""
    values = np.asarray(noise_scale_terms(net, params, X, Y, batch_size)).tolist()
    return dict(zip(NOISE_SCALE_KEYS, values, strict=True))


# ------------------------------------------------- several epochs in one call

#: Epochs per compiled call of :func:`fit` (its ``epochs_per_call``): the
#: host looks at the run (history, progress, checkpoints) once per call.
EPOCHS_PER_CALL = 10
#: Patience that never stops a run (``patience=None``) inside a compiled call.
NO_PATIENCE = 2**31 - 1


class LoopCarry(NamedTuple):
    """What a run carries from epoch to epoch on the device.

    state: the training state after the last epoch run.
    best_params: the parameters of the best validation epoch so far (with no
      validation split: those of the last epoch).
    best_val: the best validation loss so far (inf before the first).
    bad_epochs: epochs since the last improvement (int32).
    done: True once an epoch gave a non-finite loss or parameters.
    """

    state: TrainState
    best_params: Params
    best_val: Array
    bad_epochs: Array
    done: Array


class EpochRecords(NamedTuple):
    """One entry per epoch slot of a call (leading axis: the call's epochs).

    ran: the slot ran an epoch (False past the last epoch, after early
      stopping or after a non-finite epoch). ok: its loss and parameters were
      finite. improved: it set a new best validation loss. grad_errors: the
      gradient check's per-layer errors (NaN where no check ran).
    """

    ran: Array
    ok: Array
    improved: Array
    batch_loss: Array
    train_loss: Array
    train_metric: Array
    val_loss: Array
    val_metric: Array
    grad_errors: Array


def init_carry(state: TrainState, best_params: Params, best_val=math.inf, bad=0):
    """The :class:`LoopCarry` of a run about to start (or resume)."""
    dtype = jax.tree.leaves(best_params)[0].dtype
    return LoopCarry(
        state,
        best_params,
        jnp.asarray(best_val, dtype),
        jnp.asarray(bad, jnp.int32),
        jnp.asarray(False),
    )


def run_epochs(
    net,
    config,
    optimizer,
    count: int,
    carry: LoopCarry,
    X,
    Y,
    val,
    base_key,
    first,
    last,
    patience,
    check_every=None,
    check_batch=None,
    *,
    sharding=None,
    hyper=None,
):
    """Epochs ``first .. first + count - 1`` (those <= ``last``) in one scan.

    Each epoch is :func:`run_epoch` with ``epoch_key(base_key, epoch)``, then
    the evaluation of the training set and of ``val`` (when not None) and,
    every ``check_every`` epochs, :func:`grad_check_errors` on
    ``check_batch``. Early stopping is decided here too: an epoch runs only
    while ``bad_epochs < patience`` and no epoch was non-finite; the others
    are skipped (``lax.cond``; under ``vmap`` they are computed and
    discarded, so a stopped member keeps its state and best parameters).
    Pure and unchecked: ``first``, ``last``, ``patience`` and ``check_every``
    may be traced ints, so one compiled function serves every call of a run.

    Returns:
      ``(carry, records)``: the :class:`LoopCarry` after the call and the
      :class:`EpochRecords` of its ``count`` slots.
    """
    dtype = carry.best_val.dtype
    nan = jnp.full((), jnp.nan, dtype)
    n_layers = net.num_layers

    def run(carry, epoch):
        state, losses, ok = run_epoch(
            net,
            config,
            optimizer,
            carry.state,
            X,
            Y,
            epoch_key(base_key, epoch),
            sharding=sharding,
            hyper=hyper,
        )
        train_loss, train_metric = core.evaluate(net, state.params, X, Y)
        if val is None:
            val_loss = val_metric = nan
            improved = ok
            best_val = carry.best_val
        else:
            val_loss, val_metric = core.evaluate(net, state.params, *val)
            improved = ok & (val_loss < carry.best_val)
            best_val = jnp.where(improved, val_loss.astype(dtype), carry.best_val)
        best = jax.tree.map(
            lambda new, old: jnp.where(improved, new, old),
            state.params,
            carry.best_params,
        )
        bad = jnp.where(improved, 0, carry.bad_epochs + jnp.where(ok, 1, 0))
        if check_batch is None:
            errors = jnp.full((n_layers,), jnp.nan, dtype)
        else:
            errors = jax.lax.cond(
                epoch % check_every == 0,
                lambda p: grad_check_errors(net, p, *check_batch).astype(dtype),
                lambda p: jnp.full((n_layers,), jnp.nan, dtype),
                state.params,
            )
        new = LoopCarry(state, best, best_val, bad.astype(jnp.int32), ~ok)
        record = EpochRecords(
            jnp.asarray(True),
            ok,
            improved,
            jnp.mean(losses).astype(dtype),
            train_loss.astype(dtype),
            train_metric.astype(dtype),
            jnp.asarray(val_loss).astype(dtype),
            jnp.asarray(val_metric).astype(dtype),
            errors,
        )
        return new, record

    def skip(carry, epoch):
        del epoch
        no = jnp.asarray(False)
        errors = jnp.full((n_layers,), jnp.nan, dtype)
        return carry, EpochRecords(no, no, no, nan, nan, nan, nan, nan, errors)

    def body(carry, i):
        epoch = first + i
        active = (epoch <= last) & ~carry.done & (carry.bad_epochs < patience)
        return jax.lax.cond(active, run, skip, carry, epoch)

    return jax.lax.scan(body, carry, jnp.arange(count, dtype=jnp.int32))


#: :func:`run_epochs` as one compiled call. ``carry`` is not donated: it stays
#: valid after the call, so a run interrupted during a call can still save the
#: state that call started from.
run_epochs_jit = jax.jit(
    run_epochs, static_argnums=(0, 1, 2, 3), static_argnames=("sharding",)
)


# --------------------------------------------------------------------- fitting


@dataclasses.dataclass
class FitResult:
    params: Params  # with early stopping the best (by validation loss), else the last
    state: TrainState  # the state at the end of the last epoch run
    history: list[dict[str, float]]
    best_epoch: int
    epochs_run: int
    stopped: str  # "completed", "early_stopping" or "non_finite"
    train_seconds: float
    message: str = ""


def fit(
    net: MLP,
    params: Params,
    train: tuple[Array, Array] | Iterable[tuple[Array, Array]],
    val: tuple[Array, Array] | Iterable[tuple[Array, Array]] | None = None,
    config: TrainConfig = TrainConfig(),
    *,
    optimizer: optax.GradientTransformation | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    devices: int | Sequence[jax.Device] | None = None,
    check_every: int | None = None,
    checkpoint_info: dict | None = None,
    log_noise_scale: bool = False,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    epochs_per_call: int = EPOCHS_PER_CALL,
) -> FitResult:
    """Train ``net`` from ``params`` on ``train``, watching ``val``.

    Args:
      net: the network (its ``keep_prob`` turns dropout on).
      params: initial parameters (also the template when resuming).
      train: (x, y) training arrays, checked like :meth:`MLP.backprop`'s; or
        a re-iterable source of (x, y) chunks (any iterable that is not a
        tuple or list, e.g. :meth:`fnnet.stream.StreamData.source`), for
        data larger than memory. Each epoch then runs the compiled epoch on
        one chunk after the other: the chunks come from
        ``train.shuffled(config.seed, epoch)`` when the source has that
        method (else from ``iter(train)``) and each chunk's rows are shuffled
        as arrays' are. Chunk i of an epoch uses the key
        ``chunk_key(epoch_key, i)``, which is the epoch key itself for i = 0,
        so one chunk holding all the rows trains exactly like the arrays.
        Each chunk leaves out its last ``rows mod batch_size`` shuffled rows;
        every new chunk shape compiles the epoch once. Training metrics come
        from a second pass over ``iter(train)`` (see
        :func:`evaluate_chunks`).
      val: optional (x, y) validation arrays (or a chunk source) for early
        stopping and history.
      config: the run's settings; ``config.seed`` seeds shuffling, dropout
        and noise (initialisation is the caller's, from its own key).
      optimizer: any optax transformation fed by the hand gradients; default
        the one named by ``config.optimizer`` (plain SGD for "sgd").
      checkpoint: file to write (atomically, from a background thread) and
        to read when ``resume``. Written after the first compiled call, then
        as ``checkpoint_every``/``checkpoint_seconds`` say (default: after
        every call), and always at the end, also when training stops on an
        error or an interruption (with the last complete call).
      resume: continue from ``checkpoint``; the final parameters are
        bit-identical to an uninterrupted run. Epochs run after the last
        checkpoint was written are run again.
      on_epoch: called with each epoch's history record, after the compiled
        call that ran the epoch (up to ``epochs_per_call`` at once).
      devices: data-parallel training over this many devices (or these
        devices): each mini-batch is split along the batch axis, which must
        divide evenly; parameters are replicated. None: one device. Under
        several processes (:func:`fnnet.distributed.initialize`), None or
        ``jax.device_count()``: every device of every process; each process
        feeds only its rows of each batch, evaluates on its first device,
        only process 0 writes the checkpoint, and the result holds ordinary
        arrays of this process.
      check_every: verify the hand gradient during training: after every
        epoch e with ``e % check_every == 0``, compare it with ``jax.grad`` on
        a fixed batch, the first ``min(GRAD_CHECK_ROWS, N)`` training rows, at
        the current parameters and in evaluation mode (no dropout, no input
        noise, no L2 penalty), and add the per-layer relative errors (eq. 23)
        to that epoch's history record as ``grad_rel_err_layer1..L`` and
        ``grad_rel_err_max`` (see :func:`grad_check_errors`; other epochs
        have no such keys). None (the default): no check, no extra work.
      checkpoint_info: JSON values stored with every checkpoint under
        ``"info"`` (e.g. the settings that rebuild the network); not compared
        on resume.
      log_noise_scale: after every epoch, estimate the gradient noise scale
        B_simple = tr(Sigma) / |G|^2 at the current parameters (see
        :func:`noise_scale`) and add ``noise_scale``, ``noise_trace`` and
        ``noise_grad_sq`` to the epoch's record.

      checkpoint_every: write a checkpoint every this many epochs (calls end
        on those epochs).
      checkpoint_seconds: write a checkpoint at the end of the first call
        that ends this many seconds or more after the last write.
      epochs_per_call: epochs run in one compiled call (:func:`run_epochs`):
        training, evaluation, early stopping and the gradient checks all
        happen on the device; the host waits for the device once per call.
        Results do not depend on it. Runs that need the host between epochs
        take one compiled epoch per call and the host's evaluation, with
        the same numbers and the same checkpoint rules: DP-SGD
        (``config.dp_clip``), ``log_noise_scale``, chunk sources (train or
        val) and sets of more than ``EVAL_ROWS`` rows.

    DP-SGD: with ``config.dp_clip`` set, every step is
    :func:`dp_train_step` (Poisson batches, clipped per-example gradients,
    Gaussian noise from the run's key); with ``dp_noise > 0`` and
    ``dp_delta`` every record also holds ``dp_epsilon``, the epsilon spent
    so far (:mod:`fnnet.privacy`). epsilon covers the parameters; the
    records' training-set statistics (batch_loss, train loss and metric,
    the noise scale) are computed without noise and are not covered.

    Returns:
      A :class:`FitResult`: with early stopping (``config.patience``) its
      ``params`` are those of the best validation epoch, otherwise those of
      the last epoch. A non-finite loss stops training (``stopped =
      "non_finite"``) with the parameters of the last good epoch.
    """
    streamed = is_chunk_source(train)
    if streamed and (devices is not None or check_every is not None):
        raise ValueError(
            "devices and check_every need train as (x, y) arrays; got a chunk "
            f"source {type(train).__name__}"
        )
    if check_every is not None and (
        isinstance(check_every, bool)
        or not isinstance(check_every, int)
        or check_every < 1
    ):
        raise InputError(
            f"check_every must be a positive int or None, got {check_every!r}"
        )
    if config.dp_clip is not None or log_noise_scale:
        what = "DP-SGD (config.dp_clip)" if config.dp_clip is not None else None
        what = what or "log_noise_scale"
        if config.dp_clip is not None and devices is not None:
            raise ValueError(
                f"DP-SGD (config.dp_clip) runs on one device, got devices={devices!r}"
            )
        if streamed:
            raise ValueError(f"{what} needs the training data in memory, not chunks")
        try:
            bw.check_outer_product_blocks(net.hidden_blocks)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
    if streamed:
        X = Y = None
    else:
        X, Y = to_device(net, params, *net.validate(params, *train, batch=True))
        check_finite_data("train", X, Y)
    if config.patience is not None and val is None:
        raise InputError(
            "config.patience needs a validation split, got val=None (patience="
            f"{config.patience}); pass val=(x_val, y_val), or "
            "TrainConfig(patience=None) to train without early stopping"
        )
    if log_noise_scale and min(config.batch_size, X.shape[0]) < 2:
        raise ValueError(
            "log_noise_scale needs batch_size >= 2 (it compares single examples "
            f"with batches), got {config.batch_size}"
        )
    if val is not None and not is_chunk_source(val):
        val = to_device(net, params, *net.validate(params, *val))
        check_finite_data("val", *val)
    for name, value in (
        ("checkpoint_every", checkpoint_every),
        ("epochs_per_call", epochs_per_call),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise InputError(f"{name} must be a positive int, got {value!r}")
    if checkpoint_seconds is not None and (
        isinstance(checkpoint_seconds, bool)
        or not isinstance(checkpoint_seconds, (int, float))
        or not checkpoint_seconds >= 0
    ):
        raise InputError(
            f"checkpoint_seconds must be a number >= 0, got {checkpoint_seconds!r}"
        )
    if checkpoint_every is not None and checkpoint_seconds is not None:
        raise InputError(
            "give checkpoint_every (epochs) or checkpoint_seconds, not both"
        )
    info = checkpoint_info
    if optimizer is None:
        optimizer = make_optimizer(config)
    sharding = host = None
    processes = jax.process_count()
    if processes > 1:  # every device of every process (fnnet.distributed)
        if streamed:
            raise ValueError(
                f"train as a chunk source runs in one process; this run has "
                f"{processes} processes (give train as (x, y) arrays)"
            )
        if config.dp_clip is not None:
            raise ValueError(
                f"DP-SGD (config.dp_clip) runs in one process on one device; this "
                f"run has {processes} processes"
            )
        devices = distributed.mesh_devices(devices)
    if devices is not None:
        sharding = batch_sharding(devices)
        n_dev, B = sharding.mesh.size, min(config.batch_size, X.shape[0])
        if B % n_dev:
            raise InputError(
                f"batch_size {B} does not split evenly over {n_dev} devices; "
                f"choose a multiple of {n_dev}"
            )
        replicated = NamedSharding(sharding.mesh, PartitionSpec())
        if processes > 1:
            # Each process keeps the data on its host and feeds its devices
            # only their rows of each batch; evaluation stays on its first
            # device, with a local copy of the (replicated) parameters.
            host = (np.asarray(X), np.asarray(Y))
        else:
            X, Y = jax.device_put((X, Y), replicated)
    base_key = jax.random.key(config.seed)
    # The epoch donates its input state, so the run owns copies of its arrays.
    state = _copy(init_state(params, optimizer))
    loop = _Loop(best_params=_copy(params))
    if resume:
        if checkpoint is None:
            raise InputError("resume=True needs a checkpoint path")
        distributed.sync("fnnet.fit: checkpoint written")  # process 0 wrote it
        state, loop, base_key = _load(checkpoint, state, loop, base_key, config, net)
    if host is not None:
        state = distributed.replicate(state, sharding.mesh)
    elif sharding is not None:
        state = jax.device_put(state, replicated)
    check_batch = None
    if check_every is not None:
        check_batch = (X[:GRAD_CHECK_ROWS], Y[:GRAD_CHECK_ROWS])

    metric = metric_name(net)
    step_config = config.step_part()
    stopped, message = "completed", ""
    start = time.perf_counter()
    patience = math.inf if config.patience is None else config.patience
    # Over several processes only process 0 writes the checkpoint.
    writer = _Writer(
        checkpoint if distributed.is_primary() else None,
        checkpoint_every,
        checkpoint_seconds,
        loop.epoch,
    )
    # DP-SGD, the noise scale, chunk sources, sets evaluated in slices (over
    # EVAL_ROWS rows) and runs over several processes (each feeds its rows)
    # take the host between epochs: one compiled epoch per call, evaluated
    # from the host, with the same numbers.
    by_epoch = (
        streamed
        or host is not None
        or log_noise_scale
        or config.dp_clip is not None
        or X.shape[0] > EVAL_ROWS
        or (val is not None and (is_chunk_source(val) or val[0].shape[0] > EVAL_ROWS))
    )
    carry = None
    try:
        if by_epoch:
            while loop.epoch < config.epochs:
                if loop.bad_epochs >= patience:  # also when resuming a stopped run
                    stopped = "early_stopping"
                    break
                epoch = loop.epoch + 1
                key = epoch_key(base_key, epoch)
                # The epoch donates ``state``: ``state`` and ``loop`` move on
                # together below, so a checkpoint never mixes two epochs.
                if streamed:
                    new_state, batch_losses, ok = _stream_epoch(
                        net,
                        step_config,
                        optimizer,
                        state,
                        train,
                        key,
                        config.seed,
                        epoch,
                    )
                elif host is None:
                    new_state, batch_losses, ok = run_epoch_jit(
                        net, step_config, optimizer, state, X, Y, key, sharding=sharding
                    )
                else:
                    new_state, batch_losses, ok = _fed_epoch(
                        net, step_config, optimizer, state, host, key, sharding, B
                    )
                if not bool(ok):
                    state = new_state  # the state from before the epoch
                    stopped = "non_finite"
                    message = (
                        f"non-finite loss in epoch {epoch}: stopped, keeping the "
                        f"parameters of epoch {epoch - 1} (try a smaller learning "
                        "rate)"
                    )
                    break
                params_now = new_state.params
                if host is not None:
                    params_now = distributed.local_copy(new_state.params)
                record = {"epoch": epoch, "batch_loss": float(jnp.mean(batch_losses))}
                if streamed:
                    train_eval = evaluate_chunks(net, params_now, train)
                else:
                    train_eval = _evaluate_prepared(net, params_now, X, Y)
                record["train_loss"], record[f"train_{metric}"] = train_eval.values()
                improved, best_val = True, loop.best_val
                if val is not None:
                    if is_chunk_source(val):
                        val_eval = evaluate_chunks(net, params_now, val)
                    else:
                        val_eval = _evaluate_prepared(net, params_now, *val)
                    record["val_loss"], record[f"val_{metric}"] = val_eval.values()
                    improved = val_eval["loss"] < loop.best_val
                    if improved:
                        best_val = val_eval["loss"]
                if check_every is not None and epoch % check_every == 0:
                    record.update(grad_check_record(net, params_now, *check_batch))
                if not streamed:  # DP-SGD needs the data in memory (checked above)
                    record.update(dp_accounting_record(config, X.shape[0], epoch))
                if log_noise_scale:
                    record.update(noise_scale(net, params_now, X, Y, config.batch_size))
                state, loop.best_val = new_state, best_val
                if improved:
                    loop.best_epoch, loop.bad_epochs = epoch, 0
                    loop.best_params = _copy(params_now)
                else:
                    loop.bad_epochs += 1
                loop.epoch = epoch
                loop.history.append(record)
                if on_epoch is not None:
                    on_epoch(record)
                if writer.due(loop.epoch):
                    here = state if host is None else distributed.local_copy(state)
                    writer.write(
                        _snapshot(
                            here, loop.best_params, loop, base_key, config, net, info
                        )
                    )
        else:
            carry = init_carry(state, loop.best_params, loop.best_val, loop.bad_epochs)
            grad_columns = grad_check_columns(net)
            while loop.epoch < config.epochs:
                if loop.bad_epochs >= patience:  # also when resuming a stopped run
                    stopped = "early_stopping"
                    break
                first = loop.epoch + 1
                carry_next, records = run_epochs_jit(
                    net,
                    step_config,
                    optimizer,
                    epochs_per_call,
                    carry,
                    X,
                    Y,
                    val,
                    base_key,
                    jnp.int32(first),
                    jnp.int32(writer.last_epoch(first, config.epochs, epochs_per_call)),
                    jnp.int32(min(patience, NO_PATIENCE)),
                    None if check_every is None else jnp.int32(check_every),
                    check_batch,
                    sharding=sharding,
                )
                records = jax.device_get(records)  # the one wait of the call
                new_history, best_epoch = [], loop.best_epoch
                bad, best_val = loop.bad_epochs, loop.best_val
                for i in np.flatnonzero(records.ran):
                    epoch = first + int(i)
                    if not records.ok[i]:
                        stopped = "non_finite"
                        message = (
                            f"non-finite loss in epoch {epoch}: stopped, keeping the "
                            f"parameters of epoch {epoch - 1} (try a smaller "
                            "learning rate)"
                        )
                        break
                    record = {
                        "epoch": epoch,
                        "batch_loss": float(records.batch_loss[i]),
                        "train_loss": float(records.train_loss[i]),
                        f"train_{metric}": float(records.train_metric[i]),
                    }
                    if val is not None:
                        record["val_loss"] = float(records.val_loss[i])
                        record[f"val_{metric}"] = float(records.val_metric[i])
                    if records.improved[i]:
                        best_epoch, bad = epoch, 0
                        if val is not None:
                            best_val = record["val_loss"]
                    else:
                        bad += 1
                    if check_every is not None and epoch % check_every == 0:
                        errors = records.grad_errors[i].tolist()
                        values = [*errors, float(np.max(records.grad_errors[i]))]
                        record.update(zip(grad_columns, values, strict=True))
                    new_history.append(record)
                # The run's state and its bookkeeping move on together.
                carry = carry_next
                loop.history.extend(new_history)
                loop.epoch += len(new_history)
                loop.best_epoch, loop.bad_epochs = best_epoch, bad
                loop.best_val = best_val
                if on_epoch is not None:
                    for record in new_history:
                        on_epoch(record)
                if writer.due(loop.epoch):
                    writer.write(
                        _snapshot(
                            carry.state,
                            carry.best_params,
                            loop,
                            base_key,
                            config,
                            net,
                            info,
                        )
                    )
                if stopped == "non_finite":
                    break
            state, loop.best_params = carry.state, carry.best_params
    finally:
        # The last checkpoint is always written: at the end, after an error
        # or an interruption (KeyboardInterrupt), with the last complete
        # call (or epoch). An epoch interrupted inside its call has consumed
        # ``state`` (donated): the checkpoint on disk is then the last one.
        if carry is not None:
            state, best = carry.state, carry.best_params
        else:
            best = loop.best_params
        if (
            writer.path is not None
            and writer.written != loop.epoch
            and not _deleted(state)
        ):
            here = state if host is None else distributed.local_copy(state)
            writer.write(_snapshot(here, best, loop, base_key, config, net, info))
        writer.close()
    seconds = time.perf_counter() - start
    if host is not None:  # ordinary arrays for the caller, as in one process
        state = distributed.local_copy(state)
    return FitResult(
        params=loop.best_params if config.patience is not None else state.params,
        state=state,
        history=loop.history,
        best_epoch=loop.best_epoch,
        epochs_run=loop.epoch,
        stopped=stopped,
        train_seconds=seconds,
        message=message,
    )


def is_chunk_source(data) -> bool:
    """Whether ``fit`` takes ``data`` as chunks: an iterable, not a tuple or list.

    Raises TypeError for a one-shot iterator (it could feed one pass only).
    """
    if isinstance(data, (tuple, list)) or not isinstance(data, Iterable):
        return False
    if isinstance(data, Iterator):
        raise TypeError(
            f"a chunk source must be re-iterable (each epoch and each evaluation "
            f"reads it again); got the one-shot iterator {type(data).__name__}: "
            "pass an object whose __iter__ starts a new pass"
        )
    return True


def chunk_key(key: Array, i: int) -> Array:
    """The key of chunk ``i`` of an epoch with key ``key``: ``key`` itself for i = 0."""
    return key if i == 0 else jax.random.fold_in(key, i)


def _stream_epoch(net, config, optimizer, state, source, key, seed, epoch):
    """One epoch over a chunk source: the compiled epoch on chunk after chunk.

    Returns ``(state, losses, ok)`` like :func:`run_epoch`; when a chunk goes
    non-finite, the state from before the whole epoch.
    """
    before = _copy(state)
    chunks = source.shuffled(seed, epoch) if hasattr(source, "shuffled") else source
    params, losses, i = state.params, [], 0
    for x, y in chunks:
        if len(x) == 0:
            continue
        X, Y = to_device(net, params, *net.validate(params, x, y, batch=True))
        state, batch_losses, ok = run_epoch_jit(
            net, config, optimizer, state, X, Y, chunk_key(key, i)
        )
        del x, y, X, Y  # the chunk goes before the next one arrives
        if not bool(ok):
            return before, jnp.zeros((0,)), False
        losses.append(batch_losses)
        params, i = state.params, i + 1
    if not losses:
        raise ValueError("train (a chunk source) gave no rows in this epoch")
    return state, jnp.concatenate(losses), True


def check_finite_data(name: str, x: Array, y: Array) -> None:
    """Raise InputError if prepared data holds NaN or inf.

    Run on x and y after their conversion to the parameters' dtype, so a value
    that overflows that dtype (1e300 in float32) is caught too. Without this,
    NaN inputs surface as a non-finite loss that blames the learning rate,
    NaN validation rows make every epoch "no better" than the start, and a
    ReLU network quietly maps NaN features to predictions.

    Args:
      name: which data, for the message ("train", "val", or "" for plain x, y).
      x, y: prepared arrays (in the parameters' dtype).
    """
    for what, a in ((f"{name} x".strip(), x), (f"{name} y".strip(), y)):
        if not jnp.issubdtype(a.dtype, jnp.floating) or bool(jnp.all(jnp.isfinite(a))):
            continue
        bad = np.argwhere(~np.isfinite(np.asarray(a)))
        where = ", ".join(str(int(i)) for i in bad[0])
        raise InputError(
            f"{what} holds NaN or infinite values in {a.dtype} (first at "
            f"{what}[{where}], {len(bad)} in all); clean or rescale the data"
        )


class _Writer:
    """Checkpoints of a run: when they are due, written by a background thread.

    One write at a time, in order; a write's host copies are taken before
    the thread starts, so training goes on while it writes. An error of a
    write is raised in the training thread at the next write or at the end.
    """

    def __init__(self, path, every_epochs, every_seconds, epoch):
        self.path = None if path is None else Path(path)
        self.every_epochs, self.every_seconds = every_epochs, every_seconds
        self.written = epoch  # the epoch of the checkpoint on disk
        self.first = True
        self.time = -math.inf
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def last_epoch(self, first: int, epochs: int, per_call: int) -> int:
        """The last epoch of a call starting at ``first``: ends on a due epoch."""
        last = min(epochs, first + per_call - 1)
        if self.path is not None and self.every_epochs is not None:
            due = self.written + self.every_epochs
            if first <= due < last:
                last = due
        return last

    def due(self, epoch: int) -> bool:
        if self.path is None or epoch == self.written:
            return False
        if self.first:  # the first call always leaves a checkpoint to resume
            return True
        if self.every_epochs is not None:
            return epoch - self.written >= self.every_epochs
        if self.every_seconds is not None:
            return time.monotonic() - self.time >= self.every_seconds
        return True

    def write(self, snapshot) -> None:
        self.wait()
        tree, meta, epoch = snapshot
        self.first, self.written, self.time = False, epoch, time.monotonic()

        def save():
            try:
                ckpt.save(self.path, tree, meta)
            except BaseException as err:  # raised in the training thread
                self.error = err

        self.thread = threading.Thread(target=save, name="fnnet-checkpoint")
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        self.wait()


def _snapshot(state, best_params, loop: _Loop, base_key, config, net, info):
    """Host copies of what a checkpoint holds: (tree, meta, epoch)."""
    state, best_params = jax.device_get((state, best_params))
    tree = {"state": state, "best_params": best_params, "key": base_key}
    meta = {
        "epoch": loop.epoch,
        "best_epoch": loop.best_epoch,
        "best_val": loop.best_val if math.isfinite(loop.best_val) else None,
        "bad_epochs": loop.bad_epochs,
        "history": list(loop.history),
        "train_config": dataclasses.asdict(config),
        "net": net.describe(),
    }
    if info is not None:
        meta["info"] = info
    return tree, meta, loop.epoch


def _deleted(tree) -> bool:
    """Whether any array of ``tree`` was donated to a call (and is gone)."""
    return any(t.is_deleted() for t in jax.tree.leaves(tree))


def _copy(tree):
    return jax.tree.map(lambda t: jnp.array(t, copy=True), tree)


@dataclasses.dataclass
class _Loop:
    """Host-side bookkeeping of a run, saved with each checkpoint."""

    best_params: Params
    epoch: int = 0
    best_epoch: int = 0
    best_val: float = math.inf
    bad_epochs: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


def _load(path, state, loop, base_key, config, net):
    meta = ckpt.load_meta(path)
    saved_net = meta.get("net")
    if saved_net != json_roundtrip(net.describe()):
        raise ckpt.CheckpointError(
            f"{path}: checkpoint is for network {saved_net}, not {net.describe()}"
        )
    saved = dict(meta.get("train_config", {}))
    ours = json_roundtrip(dataclasses.asdict(config))
    for k, v in json_roundtrip(dataclasses.asdict(TrainConfig())).items():
        saved.setdefault(k, v)  # a setting newer than the checkpoint
    diff = sorted(k for k in ours if k != "epochs" and saved.get(k) != ours[k])
    if diff:
        raise ckpt.CheckpointError(
            f"{path}: checkpoint was written with other training settings: "
            + ", ".join(f"{k}={saved.get(k)!r} (now {ours[k]!r})" for k in diff)
        )
    template = {"state": state, "best_params": loop.best_params, "key": base_key}
    tree, meta = ckpt.load(path, template)
    best_val = meta["best_val"]
    loop = _Loop(
        best_params=tree["best_params"],
        epoch=int(meta["epoch"]),
        best_epoch=int(meta["best_epoch"]),
        best_val=math.inf if best_val is None else float(best_val),
        bad_epochs=int(meta["bad_epochs"]),
        history=list(meta["history"]),
    )
    return TrainState(*tree["state"]), loop, tree["key"]


def json_roundtrip(obj):
    """obj as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(obj))


def load_fit_params(path: str | Path, net: MLP, dtype) -> tuple[Params, dict]:
    """The parameters :func:`fit` returns, read back from its checkpoint.

    The parameters of the best validation epoch when the run used early
    stopping (``patience``), otherwise those of the last epoch saved: the
    ones ``fit`` returned, or would have returned had it been stopped after
    that epoch. Works for finished and interrupted runs alike.

    Args:
      path: a checkpoint written by ``fit(..., checkpoint=path)`` with its
        default optimizer (the one ``config.optimizer`` names).
      net: the network the run trained.
      dtype: its parameters' dtype.

    Returns:
      ``(params, meta)``: the parameters and the checkpoint's meta dict.

    Raises:
      CheckpointError: the file is missing, corrupt, or was written for
        another network or optimizer.
    """
    meta = ckpt.load_meta(path)
    if meta.get("net") != json_roundtrip(net.describe()):
        raise ckpt.CheckpointError(
            f"{path}: checkpoint is for network {meta.get('net')}, not {net.describe()}"
        )
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = meta.get("train_config")
    if not isinstance(saved, dict):
        raise ckpt.CheckpointError(f"{path}: no training settings in its meta")
    config = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    optimizer = make_optimizer(config)
    key = jax.random.key(0)
    params = jax.eval_shape(lambda: net.init(key, dtype))
    state = jax.eval_shape(lambda: init_state(net.init(key, dtype), optimizer))
    template = {"state": state, "best_params": params, "key": key}
    tree, meta = ckpt.load(path, template)
    if config.patience is not None:
        return tree["best_params"], meta
    return tree["state"].params, meta
