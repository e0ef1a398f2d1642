"""The functional core: trusted inputs, no checks, jit and vmap friendly.

Every function here is pure and takes the network configuration ``net`` (an
:class:`fnnet.MLP`, hashable and static under ``jax.jit``), the parameters
and arrays. Nothing is validated: ``x`` is already in the parameters' dtype
and ``y`` went through :func:`prepare`. Bad shapes give JAX's own errors or
wrong numbers, so call these from code that validated its inputs once, at
its boundary (:meth:`fnnet.MLP.validate` does that), or use the checked
methods of :class:`fnnet.MLP`.

The forward pass (docs/derivation.md eqs. 1, 2) keeps what the backward pass
needs in a :class:`Trace`; :func:`backprop` runs the output/loss head
(eqs. 5-7) and the hand-written delta recursion of :mod:`fnnet.backward`
(eqs. 8-14). :func:`hand_cost` and :func:`hand_forward` register that
backward pass as JAX's derivative (``jax.custom_vjp``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fnnet import backward as bw
from fnnet import blocks, losses
from fnnet import precision as mp
from fnnet.activations import output_fn
from fnnet.types import Array, Grads, Params


class Trace(NamedTuple):
    """What the forward pass keeps for the backward pass.

    a: pre-activations a^(1..L) (eq. 1); a[-1] are the logits.
    z: z^(0..L): z[0] = x, z[l] the input of layer l + 1's affine block
      (after dropout), z[L] = yhat (eq. 2).
    caches: the hidden blocks' caches, one per hidden layer.
    masks: the scaled dropout masks of the hidden layers, or None.
    """

    a: list
    z: list
    caches: list
    masks: tuple | None


class HandGrads(NamedTuple):
    """What the hand-written backward pass returns."""

    J: Array  # the cost
    grads: Grads  # dJ/dparams, the structure of params
    dx: Array | None  # dJ/dx when asked for
    dy: Array | None  # dJ/dy when asked for (float targets only)


def prepare(net, params: Params, x: Array, y: Array | None = None):
    """Convert x and float y to the parameters' dtype; give y the output's shape.

    Returns ``(x, y)`` (y None when not given). Integer labels stay integers.
    """
    dtype = params[0]["W"].dtype
    x = jnp.asarray(x).astype(dtype)
    if y is None:
        return x, None
    y = jnp.asarray(y)
    if jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(dtype)
        if y.shape != (*x.shape[:-1], net.sizes[-1]):
            y = y[..., None]  # (N,) or () targets of a single output unit
    return x, y


def dropout_masks(
    net, key: Array | None, batch: tuple[int, ...], dtype, keep_prob=None
):
    """Scaled masks m / p for every hidden layer (eq. 20), or None without a key.

    ``keep_prob``: p, when not ``net.keep_prob`` (a traced value in a sweep).
    """
    if key is None:
        return None
    p = net.keep_prob if keep_prob is None else keep_prob
    keys = jax.random.split(key, net.num_layers - 1)
    return tuple(
        jax.random.bernoulli(k, p, (*batch, m)).astype(dtype) / jnp.asarray(p, dtype)
        for k, m in zip(keys, net.sizes[1:-1], strict=True)
    )


def masks_for(net, key: Array | None, x: Array, keep_prob=None):
    """:func:`dropout_masks` for the rows of a prepared ``x``."""
    return dropout_masks(net, key, x.shape[:-1], x.dtype, keep_prob)


def block_params(layer, block):
    """The parameters of a hidden block in its layer's dict (None if it has none)."""
    return layer[block.name] if block.init else None


def forward_cache(net, params: Params, x: Array, masks=None) -> Trace:
    """Forward pass through every layer's blocks, keeping the :class:`Trace`.

    Args:
      net: the configuration.
      params: the parameters.
      x: (M_0,) or (N, M_0) input, already in the parameters' dtype.
      masks: optional scaled dropout masks of the hidden layers.
    """
    a_list, z_list, caches = [], [x], []
    z = x
    hidden = net.hidden_blocks
    for l, layer in enumerate(params):
        a = blocks.affine(layer["W"], layer["b"], z, net.precision)  # eq. 1
        if l < len(hidden):
            block = hidden[l]
            with mp.scope(net.precision):  # a user block's own products
                z, cache = block.forward(block_params(layer, block), a)  # eq. 2
            caches.append(cache)
            if masks is not None:
                z = blocks.DROPOUT.forward(masks[l], z)[0]  # eq. 20
        else:
            z = output_fn(net.output)(a)
        a_list.append(a)
        z_list.append(z)
    return Trace(a_list, z_list, caches, masks)


def forward(net, params: Params, x: Array, masks=None) -> Array:
    """yhat = z^(L) for a prepared x."""
    return forward_cache(net, params, x, masks).z[-1]


def mean_loss(net, trace: Trace, y: Array) -> Array:
    """J = mean of L_i over the batch (eq. 3), from a forward pass's trace."""
    return jnp.mean(losses.per_example_loss(net.loss, trace.a[-1], trace.z[-1], y))


def cost(net, params: Params, x: Array, y: Array, masks=None) -> Array:
    """J for prepared x and y: the function ``jax.grad`` differentiates."""
    return mean_loss(net, forward_cache(net, params, x, masks), y)


def backprop(
    net,
    params: Params,
    x: Array,
    y: Array,
    masks=None,
    input_grad: bool = False,
    target_grad: bool = False,
) -> HandGrads:
    """J and its gradients by the hand-written backward pass.

    One example (x of shape (M_0,)) uses outer products; a batch (N, M_0) the
    matrix form, with every row's delta divided by N (eqs. 12-14).

    Args:
      net, params: the network.
      x, y: prepared (see :func:`prepare`).
      masks: scaled dropout masks (training mode) or None.
      input_grad: also return dJ/dx (eq. 11).
      target_grad: also return dJ/dy for float targets.
    """
    trace = forward_cache(net, params, x, masks)
    J = mean_loss(net, trace, y)
    head = blocks.head(net.output, net.loss)
    dy, delta_L = head.backward(y, (trace.a[-1], trace.z[-1]), 1.0)  # eqs. 5-7
    grads, dx = bw.backward(
        params, trace, delta_L, net.hidden_blocks, input_grad, net.precision
    )
    return HandGrads(J, grads, dx, dy if target_grad else None)


def per_example_grads(net, params: Params, x: Array, y: Array, masks=None):
    """L_i (N,) and per-example gradients (leading axis N on every leaf).

    ``jax.vmap`` of the single-example hand-written backward pass over the
    rows of prepared x and y.

    Args:
      net, params: the network.
      x, y: a prepared batch, (N, M_0) and its N targets.
      masks: the batch's scaled dropout masks, each (N, M_l) (as
        :func:`masks_for` draws them for x), or None. Example i uses row i
        of every mask, so the mean of the per-example gradients is the batch
        gradient of :func:`backprop` with the same masks.
    """

    def one(xi, yi, mi):
        J, grads, _, _ = backprop(net, params, xi, yi, mi)
        return J, grads

    return jax.vmap(one)(x, y, masks)


# --- per-example gradient norms and clipping (eqs. 25-27) -------------------
#
# "Per-example gradient" means g_i = dL_i/dtheta, the gradient of example i's
# own loss; the batch gradient of the mean cost is (1/N) sum_i g_i (eq. 3).


class GradNorms(NamedTuple):
    """What :func:`per_example_norms` returns (N rows, L layers)."""

    J: Array  # the cost, mean of L_i
    grads: Grads  # dJ/dparams = (1/N) sum_i g_i, as from backprop
    layer_norms: Array  # (N, L): ||g_i|| over layer l's W and b
    norms: Array  # (N,): ||g_i|| over every parameter


class ClippedGrads(NamedTuple):
    """What :func:`clipped_grads` returns (N rows)."""

    J: Array  # the cost, mean of L_i (unweighted)
    losses: Array  # (N,) L_i
    grads: Grads  # scale * sum_i c_i g_i
    norms: Array  # (N,) ||g_i|| before clipping
    factors: Array  # (N,) c_i = w_i min(1, C / ||g_i||)


def rows_and_deltas(net, params: Params, x: Array, y: Array, masks=None, scale=None):
    """The forward trace, L_i (N,) and every layer's delta rows for a batch.

    Row i of layer l's deltas is ``scale`` times delta_i^(l) = dL_i/da_i^(l)
    (``scale=None``: the per-example deltas themselves). ``scale = 1.0 / N``
    gives the rows of the mean cost, by the very operations of
    :func:`backprop` (eq. 13).
    """
    bw.check_outer_product_blocks(net.hidden_blocks)  # before any work
    trace = forward_cache(net, params, x, masks)
    a, yhat = trace.a[-1], trace.z[-1]
    L_i = losses.per_example_loss(net.loss, a, yhat, y)
    # dJ = N: the head's own 1/N cancels, leaving delta_i (eqs. 5-7).
    _, delta_L = blocks.head(net.output, net.loss).backward(y, (a, yhat), float(len(x)))
    if scale is not None:
        delta_L = delta_L * jnp.asarray(scale, delta_L.dtype)
    return (
        trace,
        L_i,
        bw.layer_deltas(params, trace, delta_L, net.hidden_blocks, net.precision),
    )


def _sq_norms(trace, deltas, scale) -> Array:
    """(N, L) squared per-example norms from rows that carry a factor ``scale``."""
    sq = [bw.per_example_sq_norms(d, z) for d, z in zip(deltas, trace.z, strict=False)]
    sq = jnp.stack(sq, axis=1)
    return sq if scale is None else sq / jnp.asarray(scale * scale, sq.dtype)


def _as_params(params: Params, grads: list) -> Grads:
    return jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(grads))


def per_example_norms(net, params: Params, x: Array, y: Array, masks=None):
    """J, the batch gradients and every example's gradient norm, in one pass.

    The norms come from the rows the batched backward already holds (eq. 25):
    ||g_i||^2 of layer l is ||delta_i||^2 (||z_i||^2 + 1), where delta_i and
    z_i are rows of Delta^(l) and Z^(l-1). No per-example gradient is formed.
    The batch gradients are those of :func:`backprop` (eq. 14).

    Args:
      net, params: the network; its hidden blocks must have no parameters.
      x: (N, M_0), y: targets; prepared (see :func:`prepare`).
      masks: scaled dropout masks (training mode) or None. Example i's
        gradient is taken with its own row of every mask.

    Returns:
      A :class:`GradNorms`.
    """
    scale = 1.0 / len(x)  # the rows of the mean cost, as in backprop
    trace, L_i, deltas = rows_and_deltas(net, params, x, y, masks, scale)
    grads = [
        {"W": bw.weight_grad(d, z, net.precision), "b": bw.bias_grad(d)}
        for d, z in zip(deltas, trace.z, strict=False)
    ]
    sq = _sq_norms(trace, deltas, scale)
    return GradNorms(
        jnp.mean(L_i),
        _as_params(params, grads),
        jnp.sqrt(sq),
        jnp.sqrt(jnp.sum(sq, axis=1)),
    )


def clip_factors(norms: Array, clip, weights: Array | None = None) -> Array:
    """c_i = w_i min(1, C / ||g_i||): scales g_i to norm at most C (eq. 27).

    ``clip`` may be ``inf`` (every c_i = w_i); a zero gradient keeps c_i = w_i.
    """
    C = jnp.asarray(clip, norms.dtype)
    safe = jnp.where(norms > 0, norms, jnp.ones_like(norms))
    c = jnp.where(norms > C, C / safe, jnp.ones_like(norms))
    return c if weights is None else c * weights.astype(norms.dtype)


def clipped_grads(
    net,
    params: Params,
    x: Array,
    y: Array,
    clip,
    masks=None,
    weights: Array | None = None,
    scale: float | None = None,
) -> ClippedGrads:
    """sum_i c_i g_i with every g_i clipped to norm ``clip``, in one pass (eq. 27).

    The norms (eq. 25) give c_i = w_i min(1, C / ||g_i||); then each layer
    takes one product on scaled rows, (c * Delta)^T Z and sum_i c_i delta_i
    (eq. 26), the size of the batch gradient's. No per-example gradient is
    formed.

    Args:
      net, params: the network; its hidden blocks must have no parameters.
      x: (N, M_0), y: targets; prepared (see :func:`prepare`).
      clip: the bound C > 0 (a float or a scalar array; ``inf``: no clipping).
      masks: scaled dropout masks (training mode) or None.
      weights: optional (N,) row weights w_i (0 drops a padding row).
      scale: a Python float multiplying the sum, applied to delta^(L) before
        the recursion: ``1.0 / N`` gives the clipped mean, and with
        ``clip=inf`` and no weights exactly the gradients of :func:`backprop`
        (the same operations). None: the plain sum.

    Returns:
      A :class:`ClippedGrads`.
    """
    trace, L_i, deltas = rows_and_deltas(net, params, x, y, masks, scale)
    norms = jnp.sqrt(jnp.sum(_sq_norms(trace, deltas, scale), axis=1))
    c = clip_factors(norms, clip, weights)
    grads = [
        bw.weighted_grads(d, z, c, net.precision)
        for d, z in zip(deltas, trace.z, strict=False)
    ]
    return ClippedGrads(jnp.mean(L_i), L_i, _as_params(params, grads), norms, c)


def noise_scale_estimates(norms: Array, grads: Grads):
    """Unbiased estimates of tr(Sigma) and |G|^2 from one batch (eq. 28).

    Sigma is the covariance of the per-example gradient g_i and G its mean
    over the data. With B rows, S = mean_i ||g_i||^2 and g_bar the batch
    gradient: E[S] = |G|^2 + tr(Sigma) and E[||g_bar||^2] = |G|^2 +
    tr(Sigma) / B, so

        tr(Sigma) ~ (S - ||g_bar||^2) B / (B - 1)
        |G|^2     ~ (B ||g_bar||^2 - S) / (B - 1)

    (McCandlish et al. 2018, Appendix A, with the two batch sizes 1 and B).

    Args:
      norms: (B,) per-example gradient norms ||g_i||, B >= 2.
      grads: the batch gradient g_bar = (1/B) sum_i g_i.

    Returns:
      ``(trace, grad_sq)``, two scalars.
    """
    B = norms.shape[0]
    S = jnp.mean(jnp.square(norms))
    g_sq = sum(jnp.sum(jnp.square(t)) for t in jax.tree.leaves(grads))
    return (S - g_sq) * (B / (B - 1)), (B * g_sq - S) / (B - 1)


# --- the hand backward as JAX's derivative (jax.custom_vjp) -----------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def hand_cost(net, params: Params, x: Array, y: Array, masks) -> Array:
    """J (prepared x, y) whose derivative is the hand-written backward pass."""
    return cost(net, params, x, y, masks)


def _hand_cost_fwd(net, params, x, y, masks):
    J, grads, dx, dy = backprop(net, params, x, y, masks, True, True)
    return J, (grads, dx, dy)


def _hand_cost_bwd(net, res, g):
    grads, dx, dy = res
    scale = lambda t: None if t is None else g * t  # noqa: E731
    return jax.tree.map(scale, grads), scale(dx), scale(dy), None


hand_cost.defvjp(_hand_cost_fwd, _hand_cost_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def hand_forward(net, params: Params, x: Array) -> Array:
    """yhat (prepared x) whose VJP is the general output rule + delta recursion."""
    return forward(net, params, x)


def _hand_forward_fwd(net, params, x):
    trace = forward_cache(net, params, x)
    return trace.z[-1], (params, trace)


def _hand_forward_bwd(net, res, g):
    params, trace = res
    delta_L = losses.output_delta_from_grad(net.output, trace.a[-1], trace.z[-1], g)
    return bw.backward(params, trace, delta_L, net.hidden_blocks, True, net.precision)


hand_forward.defvjp(_hand_forward_fwd, _hand_forward_bwd)


# --- evaluation --------------------------------------------------------------


def metric_name(net) -> str:
    """ "accuracy" for bce / cross_entropy networks, "r2" for the others."""
    return "accuracy" if net.loss in ("bce", "cross_entropy") else "r2"


def metric(net, yhat: Array, y: Array) -> Array:
    """The metric of predictions yhat: accuracy, or R^2 averaged over targets.

    NaN when any prediction or target is not finite (or a label lies outside
    [0, K)): an accuracy counted from NaN outputs would look valid.
    """
    if net.loss in ("cross_entropy", "bce"):
        if net.loss == "bce":  # one or several independent binary labels
            accuracy = jnp.mean((yhat > 0.5) == (y > 0.5))
            ok = jnp.all(jnp.isfinite(y))
        elif jnp.issubdtype(y.dtype, jnp.integer):
            predicted = jnp.argmax(yhat, axis=-1).astype(y.dtype)
            accuracy = jnp.mean(predicted == y)
            ok = jnp.all((y >= 0) & (y < yhat.shape[-1]))
        else:
            predicted = jnp.argmax(yhat, axis=-1)
            accuracy = jnp.mean(predicted == jnp.argmax(y, -1))
            ok = jnp.all(jnp.isfinite(y))
        ok = ok & jnp.all(jnp.isfinite(yhat))
        return jnp.where(ok, accuracy, jnp.asarray(jnp.nan, accuracy.dtype))
    ss_res = jnp.sum(jnp.square(y - yhat), axis=0)
    ss_tot = jnp.sum(jnp.square(y - jnp.mean(y, axis=0, keepdims=True)), axis=0)
    return jnp.mean(1.0 - ss_res / ss_tot)


def evaluate(net, params: Params, x: Array, y: Array):
    """(J, metric) for prepared arrays, in evaluation mode (no dropout)."""
    trace = forward_cache(net, params, x)
    return mean_loss(net, trace, y), metric(net, trace.z[-1], y)
