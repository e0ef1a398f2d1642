"""Blocks: the derivation's layers as pairs of pure functions.

See docs/derivation.md#blocks. A block is

    forward(params, x)            -> (y, cache)
    backward(params, cache, dy)   -> (dparams, dx)        (eq. 15)

where ``dy = dJ/dy`` is the upstream gradient, ``dx = dJ/dx`` goes on to the
block before, and ``dparams`` has the structure of ``params`` (None for a block
without parameters). ``backward`` is written by hand; :func:`fnnet.verify`
holds it against ``jax.vjp`` of ``forward`` and finite differences.

Blocks work on the last axis and treat leading axes as rows: ``x`` is one
example (M,) or a batch (N, M), and a batch's ``dparams`` are summed over
the rows (the batch gradient of a mean cost; the head divides by N).

Built-in blocks: :data:`AFFINE` (eq. 1), every :class:`fnnet.Activation`
(elementwise, eq. 16), :data:`DROPOUT` (eqs. 20, 21), and the output/loss
:func:`head` (eqs. 5-7). A network layer is ``AFFINE``, then its hidden block,
then ``DROPOUT`` in training; :func:`fnnet.backward.backward` runs them in
reverse. A user's :class:`Block` takes the place of a hidden activation: it
maps a^(l) to z^(l) of the same width, and its parameters live in that
layer's dict under the block's name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fnnet import backward as bw
from fnnet import losses
from fnnet.activations import (
    DEFAULT_WEIGHT_INIT,
    check_weight_init,
    name_of,
    output_fn,
)
from fnnet.types import Array, check_extension

#: Parameter keys of the affine block; a user block's name must differ from them.
AFFINE_KEYS = ("W", "b")


@dataclasses.dataclass(frozen=True)
class Block:
    """A block with a hand-written backward pass.

    Args:
      name: a short name; the key of the block's parameters in its layer's
        dict, and the name in messages and reports.
      forward: ``forward(params, x) -> (y, cache)``, y shaped like x.
      backward: ``backward(params, cache, dy) -> (dparams, dx)``.
      init: ``init(key, width, dtype) -> params`` for a block with
        parameters (a pytree of arrays), or None for a block without.
      weight_init: how :meth:`fnnet.MLP.init` draws the weights of the
        affine map before the block, as for :class:`fnnet.Activation`:
        ``"lecun"`` (the default), ``"he"`` or ``"glorot"``.

    Frozen and hashable (functions compare by identity), so a network that
    holds it is a valid static argument of ``jax.jit``.

    Example: a residual block ``y = x + relu(V x + c)`` (docs and README)::

        def fwd(p, x):
            u = x @ p["V"].T + p["c"]
            return x + jnp.maximum(u, 0), (x, u)

        def bwd(p, cache, dy):
            x, u = cache
            du = (u > 0) * dy
            rows = tuple(range(du.ndim - 1))
            dV = jnp.tensordot(du, x, axes=(rows, rows))
            return {"V": dV, "c": du.sum(rows)}, dy + du @ p["V"]

        def init(key, width, dtype):
            V = jax.random.normal(key, (width, width), dtype) / width**0.5
            return {"V": V, "c": jnp.zeros(width, dtype)}

        residual = fnnet.Block("residual", fwd, bwd, init)
    """

    name: str
    forward: Callable[[Any, Array], tuple[Array, Any]]
    backward: Callable[[Any, Any, Array], tuple[Any, Array]]
    init: Callable[[Array, int, Any], Any] | None = None
    weight_init: str = DEFAULT_WEIGHT_INIT

    def __post_init__(self):
        check_extension("Block", self, ("forward", "backward"), ("init",))
        check_weight_init("Block", self)
        if self.name in AFFINE_KEYS:
            raise ValueError(
                f"Block name {self.name!r} clashes with the layer's {AFFINE_KEYS} "
                "keys; choose another name"
            )


def affine(W: Array, b: Array, z: Array, precision=None) -> Array:
    """a = W z + b (eq. 1) for one example; A = Z W^T + b for rows (eq. 12).

    ``precision``: the product's precision, a name of
    :data:`fnnet.precision.PRECISIONS` or a ``jax.lax.Precision`` (None: the
    platform default).
    """
    if z.ndim == 1:
        return jnp.matmul(W, z, precision=precision) + b
    # Z W^T as one dot_general contracting the feature axes: no transposed copy.
    ZWt = jax.lax.dot_general(z, W, (((1,), (1,)), ((), ())), precision)
    return ZWt + b[None, :]


def _affine_forward(layer, z):
    return affine(layer["W"], layer["b"], z), z


def affine_init(key: Array, fan_in: int, fan_out: int, dtype, gain2: float = 1.0):
    """{"W": (fan_out, fan_in), "b": (fan_out,)}: W ~ N(0, gain2 / fan_in), b = 0."""
    W = jax.random.normal(key, (fan_out, fan_in), dtype) * math.sqrt(gain2 / fan_in)
    return {"W": W, "b": jnp.zeros((fan_out,), dtype)}


#: The affine block a = W z + b: params {"W": (M_out, M_in), "b": (M_out,)},
#: cache z. Its ``init(key, (fan_in, fan_out), dtype)`` draws W ~ N(0, 1/fan_in).
AFFINE = Block(
    "affine",
    _affine_forward,
    bw.affine_backward,
    lambda key, widths, dtype: affine_init(key, *widths, dtype),
)


def _dropout_forward(mask, z):
    return z * mask, None


#: Inverted dropout (eqs. 20, 21). Its "parameters" are the scaled mask m / p,
#: drawn by :func:`fnnet.core.dropout_masks`; it has no trainable parameters.
DROPOUT = Block("dropout", _dropout_forward, bw.dropout_backward)


def head(output, loss) -> Block:
    """The output/loss head: from a^(L) to the cost J (eqs. 3, 5-7).

    The head's "parameters" are the targets y (dense, in the output's dtype,
    or integer labels for cross-entropy): ``forward(y, a) -> (J, cache)`` and
    ``backward(y, cache, dJ) -> (dJ/dy, dJ/da)``, where dJ/da = dJ * delta^(L)
    / N for a batch of N rows and dJ/dy is None for integer labels.

    Args:
      output: the output activation, a name or an :class:`fnnet.Activation`.
      loss: the loss, a name or an :class:`fnnet.Loss`.
    """

    def forward(y, a):
        yhat = output_fn(output)(a)
        J = jnp.mean(losses.per_example_loss(loss, a, yhat, y))
        return J, (a, yhat)

    def backward(y, cache, dJ):
        a, yhat = cache
        y_dense = losses.dense_targets(loss, y, yhat.shape[-1], yhat.dtype)
        scale = rows_scale(a, dJ)
        delta = losses.output_delta(output, loss, a, yhat, y_dense)
        dy = None
        if jnp.issubdtype(y.dtype, jnp.floating):
            dy = losses.target_grad(loss, a, yhat, y)
            dy = dy if scale is None else dy * scale
        return dy, delta if scale is None else delta * scale

    return Block(f"head({name_of(output)}, {name_of(loss)})", forward, backward)


def rows_scale(a: Array, dJ=1.0):
    """dJ / N for N rows of ``a`` (None when it is exactly 1: one example, dJ = 1)."""
    n = a.shape[0] if a.ndim == 2 else 1
    if isinstance(dJ, (int, float)):
        return None if dJ / n == 1.0 else jnp.asarray(dJ / n, a.dtype)
    return dJ if n == 1 else dJ * jnp.asarray(1.0 / n, a.dtype)


def serial(name: str, *blocks) -> Block:
    """Blocks (user Blocks or Activations) in a row, as one block.

    Its parameters are a dict ``{block.name: params}`` of the members that
    have parameters (member names must then be distinct); the backward runs
    the members' backwards in reverse, like :func:`fnnet.backward.backward`.
    Example: ``serial("ln_relu", layer_norm, fnnet.activations.ACTIVATIONS["relu"])``.
    """
    if not blocks:
        raise ValueError("serial needs at least one block")
    with_params = [b.name for b in blocks if b.init]
    if len(set(with_params)) != len(with_params):
        raise ValueError(
            f"serial {name!r}: blocks with parameters need distinct names, got "
            f"{with_params}"
        )

    def forward(params, x):
        caches = []
        for b in blocks:
            x, cache = b.forward(params[b.name] if b.init else None, x)
            caches.append(cache)
        return x, tuple(caches)

    def backward(params, caches, dy):
        grads = {}
        for b, cache in zip(reversed(blocks), reversed(caches), strict=True):
            g, dy = b.backward(params[b.name] if b.init else None, cache, dy)
            if b.init:
                grads[b.name] = g
        return (grads if with_params else None), dy

    def init(key, width, dtype):
        keys = jax.random.split(key, len(blocks))
        return {
            b.name: b.init(k, width, dtype)
            for b, k in zip(blocks, keys, strict=True)
            if b.init
        }

    return Block(name, forward, backward, init if with_params else None)


def sum_rows(t: Array, ndim: int) -> Array:
    """Sum the leading (row) axes of ``t`` down to ``ndim`` trailing axes.

    A block's parameter gradient on a batch is the sum over the rows of the
    per-example gradients; ``sum_rows(dy * xhat, 1)`` does it for a (M,)
    parameter whether x is (M,) or (N, M).
    """
    return jnp.sum(t, axis=tuple(range(t.ndim - ndim))) if t.ndim > ndim else t
