"""The hand-written backward pass: the delta recursion, block by block.

See docs/derivation.md#delta-recursion (eqs. 8-11), #matrix-form (eqs. 12-14)
and #blocks (eqs. 15, 16). Nothing here calls JAX's automatic
differentiation: every derivative is one of the formulas below, evaluated with
plain array operations.

A layer of the network is three blocks in a row: the affine block
``a = W z + b`` (eq. 1), the layer's activation block ``z = h(a)`` (eq. 2, or a
user's block), and, in training, a dropout block (eq. 20). Going backwards
through them,

    dz^(l)    = W^(l+1)^T delta^(l+1)        affine block's input gradient (eq. 15)
    dz^(l)   *= m^(l) / p                    dropout block (eq. 21)
    delta^(l) = h'(a^(l)) * dz^(l)           activation block (eq. 16)

which is eq. 8. The same code runs on one example (column vectors, outer
products) and on a mini-batch (one row per example, one matrix product per
layer); only the two lines that differ are written twice, in
:func:`weight_grad` and :func:`bias_grad`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fnnet import precision as mp
from fnnet.types import Array, Grads, Params


def propagate(W: Array, delta: Array, precision=None) -> Array:
    """W^T delta for one example; Delta W for rows (the same product, eq. 11).

    ``precision``: the product's precision, a name of
    :data:`fnnet.precision.PRECISIONS` or a ``jax.lax.Precision`` (None: the
    platform default).
    """
    return jnp.matmul(delta, W, precision=precision)


def weight_grad(delta: Array, z_prev: Array, precision=None) -> Array:
    """dL/dW^(l) = delta^(l) z^(l-1)^T (eq. 9); Delta^T Z summed over rows (eq. 14).

    ``precision``: the product's precision, a name of
    :data:`fnnet.precision.PRECISIONS` or a ``jax.lax.Precision`` (None: the
    platform default).
    """
    if delta.ndim == 1:  # elementwise products, exact whatever the precision
        return jnp.outer(delta, z_prev)
    return jax.lax.platform_dependent(
        delta,
        z_prev,
        cpu=functools.partial(_transposed_then_product, precision=precision),
        default=functools.partial(_batch_contraction, precision=precision),
    )


def _batch_contraction(delta: Array, z_prev: Array, precision=None) -> Array:
    # Delta^T Z as one dot_general contracting the batch axes.
    return jax.lax.dot_general(delta, z_prev, (((0,), (0,)), ((), ())), precision)


def _transposed_then_product(delta: Array, z_prev: Array, precision=None) -> Array:
    # XLA:CPU sends a product that contracts axis 0 of both operands to a
    # slower kernel than (M_l, N) @ (N, M_{l-1}); materialising Delta^T first
    # (the barrier stops XLA from folding the transpose back into the product)
    # measured about 5% faster per training step on 784-512-512-10, batch 256.
    return jnp.matmul(
        jax.lax.optimization_barrier(delta.T), z_prev, precision=precision
    )


def bias_grad(delta: Array) -> Array:
    """dL/db^(l) = delta^(l) (eq. 10); summed over rows for a batch (eq. 14)."""
    if delta.ndim == 1:
        return delta
    return jnp.sum(delta, axis=0)


def affine_backward(
    layer, z_prev: Array, delta: Array, need_dx: bool = True, precision=None
):
    """The affine block's backward (eq. 15): ({"W": dW, "b": db}, W^T delta).

    Args:
      layer: {"W": (M_l, M_{l-1}), "b": (M_l,), ...}; only W is read.
      z_prev: the block's cached input z^(l-1), (M_{l-1},) or (N, M_{l-1}).
      delta: the upstream gradient dL/da^(l), shaped like a^(l).
      need_dx: compute the input gradient (False for the first layer, when
        nobody asked for dL/dx).
      precision: the precision of both products (see :func:`propagate`).
    """
    grads = {"W": weight_grad(delta, z_prev, precision), "b": bias_grad(delta)}
    return grads, propagate(layer["W"], delta, precision) if need_dx else None


def dropout_backward(mask: Array, cache: Any, dz: Array):
    """The dropout block's backward (eq. 21): (None, (m / p) * dz), same mask."""
    return None, dz * mask


def backward(
    params: Params,
    trace,
    delta_L: Array,
    hidden: Sequence,
    input_grad: bool = False,
    precision: str | None = None,
) -> tuple[Grads, Array | None]:
    """Back-propagate delta^(L) through every layer's blocks, last to first.

    Args:
      params: per layer {"W": (M_l, M_{l-1}), "b": (M_l,)}, l = 1..L, plus
        the parameters of a hidden block under its name.
      trace: the forward pass's :class:`fnnet.core.Trace`: ``z`` holds the
        inputs of the affine blocks z^(0..L-1) (after dropout), ``caches`` the
        hidden blocks' caches and ``masks`` the scaled dropout masks or None.
      delta_L: output error signal delta^(L) (eqs. 5-7), already divided by N
        when rows are a batch whose cost is the mean (eq. 13).
      hidden: the hidden layers' blocks (Activations or user blocks).
      input_grad: also return dL/dx = W^(1)^T delta^(1) (eq. 11).
      precision: the network's matrix-product precision, a name of
        :data:`fnnet.precision.PRECISIONS` or None (the platform default):
        the affine blocks' products get it as an argument, a user block's
        products through :func:`fnnet.precision.scope`.

    Returns:
      ``(grads, dx)``: grads with the structure of ``params``; dx is None
      unless ``input_grad``.
    """
    L = len(params)
    grads: list[dict[str, Array]] = [{} for _ in range(L)]
    delta = delta_L
    dx = None
    for l in reversed(range(L)):  # layer l + 1 in the derivation's numbering
        layer_grads, dz = affine_backward(
            params[l], trace.z[l], delta, l > 0 or input_grad, precision
        )
        grads[l].update(layer_grads)
        if l == 0:
            dx = dz
            break
        if trace.masks is not None:
            dz = dropout_backward(trace.masks[l - 1], None, dz)[1]
        block = hidden[l - 1]
        block_params = params[l - 1].get(block.name) if block.init else None
        with mp.scope(precision):
            d_block, delta = block.backward(block_params, trace.caches[l - 1], dz)
        if block.init:
            grads[l - 1][block.name] = d_block
    # Same containers as params (tuple or list of dicts), for custom_vjp and optax.
    return jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(grads)), dx


# --- per-example gradient statistics from the batch's rows (eqs. 25-27) -----


def layer_deltas(
    params: Params, trace, delta_L: Array, hidden: Sequence, precision=None
) -> list:
    """The rows Delta^(1..L) of every layer (eq. 13), without parameter gradients.

    The same recursion, in the same order of operations, as :func:`backward`;
    it keeps every layer's deltas instead of turning them into gradients at
    once, because per-example clipping needs every layer's rows before any
    product (eq. 27).

    Args:
      params, trace, delta_L, hidden, precision: as for :func:`backward`,
        on a batch.

    Returns:
      A list of L arrays, entry l - 1 of shape (N, M_l): row i is
      dL_i/da_i^(l) times whatever factor ``delta_L`` carried (1/N for the
      mean cost).

    Raises:
      ValueError: a hidden block has parameters. Their per-example gradients
        are not outer products of two rows, so eq. 25 does not give their
        norms; use ``jax.vmap`` of the one-example backward instead
        (:meth:`fnnet.MLP.per_example_grads`).
    """
    check_outer_product_blocks(hidden)
    deltas: list = [None] * len(params)
    delta = delta_L
    for l in reversed(range(len(params))):
        deltas[l] = delta
        if l == 0:
            break
        dz = propagate(params[l]["W"], delta, precision)
        if trace.masks is not None:
            dz = dropout_backward(trace.masks[l - 1], None, dz)[1]
        _, delta = hidden[l - 1].backward(None, trace.caches[l - 1], dz)
    return deltas


def check_outer_product_blocks(hidden: Sequence) -> None:
    """Raise ValueError if a hidden block has parameters (see :func:`layer_deltas`)."""
    for l, block in enumerate(hidden, 1):
        if getattr(block, "init", None) is not None:
            raise ValueError(
                f"per-example gradient norms and clipping need dense layers: the "
                f"hidden block {block.name!r} of layer {l} has parameters, whose "
                "per-example gradients are not outer products of the batch's rows; "
                "use MLP.per_example_grads (vmap of the one-example backward) for "
                "this network"
            )


def per_example_sq_norms(delta: Array, z_prev: Array) -> Array:
    """||dL_i/dW^(l)||^2 + ||dL_i/db^(l)||^2 for every row i (eq. 25).

    = ||delta_i||^2 (||z_i||^2 + 1), from the rows alone: the outer product
    delta_i z_i^T is never formed.

    Args:
      delta: (N, M_l) rows delta_i^(l) (of the per-example loss L_i).
      z_prev: (N, M_{l-1}) rows z_i^(l-1), the layer's input.

    Returns:
      (N,) squared norms.
    """
    z_sq = jnp.sum(jnp.square(z_prev), axis=-1)
    return jnp.sum(jnp.square(delta), axis=-1) * (z_sq + 1)


def weighted_grads(
    delta: Array, z_prev: Array, c: Array, precision=None
) -> dict[str, Array]:
    """sum_i c_i delta_i z_i^T and sum_i c_i delta_i: (c * Delta)^T Z (eq. 26).

    One product of the size of the batch gradient (eq. 14), on rows scaled
    by ``c`` (N,), at ``precision`` (see :func:`propagate`).
    """
    scaled = delta * c[:, None]
    return {"W": weight_grad(scaled, z_prev, precision), "b": bias_grad(scaled)}
