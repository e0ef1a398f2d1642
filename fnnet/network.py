"""The multi-layer perceptron: configuration, initialisation, forward, cost, backprop.

Notation (seed 000, DERIVATION.md): ``z^(0) = x``; for l = 1..L

    a^(l) = W^(l) z^(l-1) + b^(l)        (eq. 2)
    z^(l) = h^(l)(a^(l))                 (eq. 3)

with ``W^(l)`` of shape (M_l, M_{l-1}) and ``b^(l)`` of shape (M_l,). A batch
is a matrix whose rows are examples (seed 001): ``A = Z W^T + b``.

:class:`MLP` is a frozen, hashable dataclass of Python values: it carries no
arrays, so it can be a static argument of ``jax.jit``. Parameters are a
separate pytree; every method is a pure function of its arguments.

Input checks come in two kinds:

* shape and dtype checks always run, in Python, before any computation; under
  ``jax.jit`` they run once, at trace time, and cost nothing afterwards;
* checks on values (labels in range, probability rows summing to 1, bce
  targets in [0, 1]) need concrete values, so they run only when the argument
  is not a tracer, i.e. outside ``jit``/``vmap``/``grad``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnnet import backward as bw
from fnnet import losses
from fnnet.activations import (
    ACTIVATIONS,
    HIDDEN_ACTIVATIONS,
    OUTPUT_ACTIVATIONS,
    output_fn,
)
from fnnet.types import Array, Grads, Params

# Activations whose weights get He initialisation (variance 2 / fan_in).
_RELU_LIKE = ("relu", "leaky_relu", "elu", "gelu")


@dataclasses.dataclass(frozen=True)
class MLP:
    """A fully connected feed-forward network and its cost.

    Args:
      sizes: layer widths ``(M_0, M_1, ..., M_L)``: M_0 inputs, M_L outputs,
        at least two entries.
      activation: hidden activation h^(1..L-1), one name for every hidden
        layer or one name per hidden layer. One of ``HIDDEN_ACTIVATIONS``.
      output: output activation h^(L): any hidden activation name, or
        ``"softmax"``.
      loss: name of the per-example loss L_i: ``"mse"``, ``"bce"`` (needs a
        sigmoid output) or ``"cross_entropy"`` (needs a softmax output).
      keep_prob: inverted-dropout keep probability p of the hidden layers'
        outputs (1.0: no dropout). Dropout is applied only when a ``key`` is
        passed to ``forward``/``cost``/``backprop``; without one the network
        is in evaluation mode.

    Example::

        net = MLP(sizes=(64, 128, 10), activation="relu", output="softmax",
                  loss="cross_entropy")
        params = net.init(jax.random.key(0))
        J, grads = net.backprop(params, x, y)
    """

    sizes: tuple[int, ...]
    activation: str | tuple[str, ...] = "relu"
    output: str = "identity"
    loss: str = "mse"
    keep_prob: float = 1.0

    def __post_init__(self):
        sizes = self.sizes
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
            raise TypeError(f"sizes must be a tuple of ints, got {sizes!r}")
        if len(sizes) < 2:
            raise ValueError(
                f"sizes must list at least the input and output widths, got {sizes!r}"
            )
        for m in sizes:
            if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
                raise ValueError(f"sizes must be positive ints, got {sizes!r}")
        object.__setattr__(self, "sizes", tuple(int(m) for m in sizes))

        act = self.activation
        if isinstance(act, str):
            names = (act,)
        elif isinstance(act, Sequence) and all(isinstance(n, str) for n in act):
            names = tuple(act)
            object.__setattr__(self, "activation", names)
            n_hidden = len(self.sizes) - 2
            if len(names) != n_hidden:
                raise ValueError(
                    f"activation has {len(names)} names but sizes={self.sizes} has "
                    f"{n_hidden} hidden layers; give one name per hidden layer or a "
                    "single name for all"
                )
        else:
            raise TypeError(f"activation must be a str or a tuple of str, got {act!r}")
        for name in names:
            if name not in HIDDEN_ACTIVATIONS:
                raise ValueError(
                    f"activation {name!r} is not supported; choose one of "
                    f"{HIDDEN_ACTIVATIONS}"
                )
        if self.output not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"output {self.output!r} is not supported; choose one of "
                f"{OUTPUT_ACTIVATIONS}"
            )
        if self.loss not in losses.LOSSES:
            raise ValueError(
                f"loss {self.loss!r} is not supported; choose one of {losses.LOSSES}"
            )
        needed = losses.REQUIRED_OUTPUT[self.loss]
        if needed is not None and self.output != needed:
            raise ValueError(
                f"loss={self.loss!r} needs output={needed!r}, got output="
                f"{self.output!r} (mse works with any output)"
            )
        if self.loss == "cross_entropy" and self.sizes[-1] < 2:
            raise ValueError(
                "loss='cross_entropy' needs at least 2 output units, got "
                f"sizes[-1]={self.sizes[-1]}; use output='sigmoid', loss='bce' "
                "for one"
            )
        p = self.keep_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"keep_prob must be a float in (0, 1], got {p!r}")
        object.__setattr__(self, "keep_prob", float(p))

    # ----------------------------------------------------------------- structure

    @property
    def num_layers(self) -> int:
        """L, the number of layers with parameters."""
        return len(self.sizes) - 1

    @property
    def hidden_activations(self) -> tuple[str, ...]:
        """Names of h^(1..L-1)."""
        if isinstance(self.activation, str):
            return (self.activation,) * (self.num_layers - 1)
        return self.activation

    # ---------------------------------------------------------------- public API

    def init(self, key: Array, dtype=jnp.float32) -> Params:
        """Random initial parameters, a tuple of {"W": (M_l, M_{l-1}), "b": (M_l,)}.

        W^(l) ~ N(0, gain^2 / M_{l-1}) with gain^2 = 2 when h^(l) is ReLU-like
        (relu, leaky_relu, elu, gelu: He et al.) and 1 otherwise (LeCun; the
        output layer too); biases start at 0.

        Args:
          key: a JAX PRNG key, split once per layer.
          dtype: floating dtype of every leaf; all computation runs in it.
        """
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        keys = jax.random.split(key, self.num_layers)
        acts = (*self.hidden_activations, self.output)
        params = []
        for k, fan_in, fan_out, act in zip(
            keys, self.sizes[:-1], self.sizes[1:], acts, strict=True
        ):
            std = math.sqrt((2.0 if act in _RELU_LIKE else 1.0) / fan_in)
            W = jax.random.normal(k, (fan_out, fan_in), dtype) * std
            params.append({"W": W, "b": jnp.zeros((fan_out,), dtype)})
        return tuple(params)

    def forward(self, params: Params, x: Array, *, key: Array | None = None) -> Array:
        """yhat = z^(L): (M_0,) -> (M_L,) for one example, (N, M_0) -> (N, M_L).

        Args:
          params: as returned by :meth:`init`.
          x: one example (M_0,) or a batch (N, M_0), floating.
          key: PRNG key for dropout (training mode); None for evaluation.
        """
        self._check_params(params)
        x = self._check_x(x)
        self._check_key(key)
        return _forward(self, params, x, key)

    def cost(self, params: Params, x: Array, y: Array, *, key: Array | None = None):
        """J: the mean of the per-example loss L_i over the batch (L_i for one example).

        Differentiable with ``jax.grad`` (that is the automatic reference the
        hand-written :meth:`backprop` is checked against).

        Args:
          params: as returned by :meth:`init`.
          x: (M_0,) or (N, M_0).
          y: targets; see :meth:`backprop`.
          key: PRNG key for dropout (training mode); None for evaluation.
        """
        self._check_params(params)
        x = self._check_x(x)
        y = self._check_y(y, x)
        self._check_key(key)
        return _cost(self, params, x, y, key)

    def backprop(
        self,
        params: Params,
        x: Array,
        y: Array,
        *,
        key: Array | None = None,
        input_grad: bool = False,
    ):
        """J and dJ/dparams from the hand-written backward pass (eqs. 9-14).

        One example (x of shape (M_0,)) runs Algorithm 1 with outer products; a
        batch (x of shape (N, M_0)) runs seed 001's matrix form. Both give the
        gradient of the mean loss, so ``jax.vmap(net.backprop, in_axes=(None,
        0, 0))`` yields per-example gradients whose mean is the batch gradient.

        Args:
          params: as returned by :meth:`init`.
          x: (M_0,) or (N, M_0), floating; converted to the parameters' dtype.
          y: targets. ``mse``/``bce``: floating, the output's shape ((N, M_L)
            or (M_L,)); with one output unit (N,) or () is accepted too.
            ``bce`` targets lie in [0, 1]. ``cross_entropy``: integer labels
            in [0, M_L) of shape (N,) or (), or probability rows of shape
            (N, M_L) or (M_L,) that sum to 1.
          key: PRNG key for dropout; the backward pass reuses the forward's mask.
          input_grad: also return dJ/dx, shaped like x.

        Returns:
          ``(J, grads)``, or ``(J, grads, dx)`` with ``input_grad=True``;
          ``grads`` has the structure of ``params``.
        """
        self._check_params(params)
        x = self._check_x(x)
        y = self._check_y(y, x)
        self._check_key(key)
        J, grads, dx = _backprop(self, params, x, y, key, input_grad)
        return (J, grads, dx) if input_grad else (J, grads)

    def per_example_grads(self, params: Params, x: Array, y: Array):
        """Per-example losses L_i (N,) and gradients (leading axis N on every leaf).

        ``jax.vmap`` of the single-example hand-written backward pass.
        """
        self._check_params(params)
        x = self._check_x(x)
        y = self._check_y(y, x)
        if x.ndim != 2:
            raise ValueError(f"x must be a batch (N, {self.sizes[0]}), got {x.shape}")
        return _per_example(self, params, x, y)

    def hand_cost(
        self, params: Params, x: Array, y: Array, *, key: Array | None = None
    ):
        """J, with the hand-written backward registered as its derivative.

        The value equals :meth:`cost`; ``jax.grad`` (and so optax, or any JAX
        code) differentiates it by running :func:`fnnet.backward.backward`
        instead of tracing the forward pass (``jax.custom_vjp``). Gradients
        flow to ``params``, ``x`` and float ``y``.
        """
        self._check_params(params)
        x = self._check_x(x)
        y = self._check_y(y, x)
        self._check_key(key)
        return _hand_cost(self, params, x, y, key)

    def hand_forward(self, params: Params, x: Array) -> Array:
        """yhat, as :meth:`forward`, with the hand-written backward as its VJP.

        Use it to put the network inside any loss written in JAX: ``jax.grad``
        hands the cotangent dL/dyhat to the general output rule (eq. 12, or the
        softmax Jacobian-vector form) and then to the delta recursion.
        """
        self._check_params(params)
        x = self._check_x(x)
        return _hand_forward(self, params, x)

    # -------------------------------------------------------------- input checks

    def _check_params(self, params: Params) -> None:
        L = self.num_layers
        if isinstance(params, Mapping) or not isinstance(params, Sequence):
            raise TypeError(
                f"params must be a tuple or list of {L} layers "
                f"{{'W': (out, in), 'b': (out,)}}, got {type(params).__name__}"
            )
        if len(params) != L:
            raise ValueError(
                f"params has {len(params)} layers but sizes={self.sizes} needs {L}"
            )
        dtype = None
        for l, layer in enumerate(params):
            if not isinstance(layer, Mapping) or set(layer) != {"W", "b"}:
                got = sorted(layer) if isinstance(layer, Mapping) else type(layer)
                raise ValueError(
                    f"params[{l}] must be a dict with keys 'W' and 'b', got {got}"
                )
            expected = {
                "W": (self.sizes[l + 1], self.sizes[l]),
                "b": (self.sizes[l + 1],),
            }
            for name, shape in expected.items():
                leaf = layer[name]
                leaf_shape = tuple(getattr(leaf, "shape", ()))
                if leaf_shape != shape:
                    raise ValueError(
                        f"params[{l}][{name!r}] must have shape {shape} for "
                        f"sizes={self.sizes}, got {leaf_shape}"
                    )
                leaf_dtype = jnp.dtype(leaf.dtype)
                if not jnp.issubdtype(leaf_dtype, jnp.floating):
                    raise TypeError(
                        f"params[{l}][{name!r}] must be floating, got {leaf_dtype}"
                    )
                if dtype is None:
                    dtype = leaf_dtype
                elif leaf_dtype != dtype:
                    raise TypeError(
                        f"every parameter must share one dtype: params[0]['W'] is "
                        f"{dtype} but params[{l}][{name!r}] is {leaf_dtype}"
                    )

    def _check_x(self, x: Array) -> Array:
        if not hasattr(x, "shape"):
            x = np.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"x must be floating point, got dtype {x.dtype}; convert it with "
                "x.astype(np.float32)"
            )
        M0 = self.sizes[0]
        if x.ndim not in (1, 2) or x.shape[-1] != M0:
            raise ValueError(
                f"x must have shape ({M0},) or (N, {M0}) for sizes={self.sizes}, "
                f"got {tuple(x.shape)}"
            )
        return x

    def _check_y(self, y: Array, x: Array) -> Array:
        if not hasattr(y, "shape"):
            y = np.asarray(y)
        K = self.sizes[-1]
        batch = tuple(x.shape[:-1])
        out_shape = (*batch, K)
        integer = jnp.issubdtype(y.dtype, jnp.integer)
        floating = jnp.issubdtype(y.dtype, jnp.floating)
        if self.loss == "cross_entropy":
            if integer:
                if tuple(y.shape) != batch:
                    raise ValueError(
                        f"y as integer labels must have shape {batch} for x of shape "
                        f"{tuple(x.shape)}, got {tuple(y.shape)}"
                    )
            elif floating:
                if tuple(y.shape) != out_shape:
                    raise ValueError(
                        f"y as probability rows must have shape {out_shape} for x of "
                        f"shape {tuple(x.shape)}, got {tuple(y.shape)}"
                    )
            else:
                raise TypeError(
                    "y for cross_entropy must be integer labels or floating "
                    f"probabilities, got dtype {y.dtype}"
                )
        else:
            if not floating:
                raise TypeError(
                    f"y for loss={self.loss!r} must be floating point, got dtype "
                    f"{y.dtype}; convert it with y.astype(np.float32)"
                )
            ok = tuple(y.shape) == out_shape or (K == 1 and tuple(y.shape) == batch)
            if not ok:
                extra = f" or {batch}" if K == 1 else ""
                raise ValueError(
                    f"y must have shape {out_shape}{extra} (the output's shape) for "
                    f"loss={self.loss!r}, got {tuple(y.shape)}"
                )
        if not isinstance(y, jax.core.Tracer):
            self._check_y_values(np.asarray(y))
        return y

    def _check_y_values(self, y: np.ndarray) -> None:
        K = self.sizes[-1]
        if self.loss == "cross_entropy" and np.issubdtype(y.dtype, np.integer):
            bad = (y < 0) | (y >= K)
            if bad.any():
                raise ValueError(
                    f"y holds labels outside [0, {K}) for {K} output units: "
                    f"{np.unique(y[bad])[:10].tolist()}"
                )
            return
        if not np.all(np.isfinite(y)):
            raise ValueError("y holds NaN or infinite values")
        if self.loss == "bce" and ((y < 0) | (y > 1)).any():
            raise ValueError(
                f"y for loss='bce' must lie in [0, 1], got values in "
                f"[{y.min()}, {y.max()}]"
            )
        if self.loss == "cross_entropy":
            sums = y.sum(axis=-1)
            tol = 1e-3 if y.dtype.itemsize <= 2 else 1e-5
            if (y < 0).any() or not np.allclose(sums, 1.0, rtol=0, atol=tol):
                worst = float(np.max(np.abs(sums - 1.0)))
                raise ValueError(
                    "y as probability rows must be non-negative and sum to 1 "
                    f"(within {tol}); the worst row sums to 1 {worst:+.3g}"
                )

    def _check_key(self, key: Array | None) -> None:
        if key is not None and self.keep_prob == 1.0:
            raise ValueError(
                "key was given but keep_prob=1.0 means no dropout; pass "
                "keep_prob < 1 to MLP or drop the key"
            )


# ---------------------------------------------------------------------------
# Pure, compiled implementation. ``net`` is static: every function below is
# traced once per (net, shapes, dtypes) and then reused.
# ---------------------------------------------------------------------------


def affine(W: Array, b: Array, z: Array) -> Array:
    """a = W z + b (eq. 2) for one example; A = Z W^T + b for rows."""
    if z.ndim == 1:
        return W @ z + b
    # Z W^T as one dot_general contracting the feature axes: no transposed copy.
    ZWt = jax.lax.dot_general(z, W, (((1,), (1,)), ((), ())))
    return ZWt + b[None, :]


def h_primes(net: MLP):
    """h'^(1..L-1) of the hidden layers."""
    return tuple(ACTIVATIONS[name].h_prime for name in net.hidden_activations)


def dropout_masks(net: MLP, key: Array | None, batch: tuple[int, ...], dtype):
    """Scaled masks m / p for every hidden layer (inverted dropout), or None."""
    if key is None:
        return None
    p = net.keep_prob
    keys = jax.random.split(key, net.num_layers - 1)
    return tuple(
        jax.random.bernoulli(k, p, (*batch, m)).astype(dtype) / jnp.asarray(p, dtype)
        for k, m in zip(keys, net.sizes[1:-1], strict=True)
    )


def forward_cache(net: MLP, params: Params, x: Array, masks=None):
    """Forward pass keeping every a^(l) and z^(l) for the backward pass.

    Args:
      net: the configuration.
      params: the parameters.
      x: (M_0,) or (N, M_0) input, already in the parameters' dtype.
      masks: optional scaled dropout masks of the hidden layers.

    Returns:
      ``(a_list, z_list)``: a^(1..L) and z^(0..L), z^(0) = x, z^(L) = yhat.
    """
    a_list, z_list = [], [x]
    z = x
    for l, layer in enumerate(params):
        a = affine(layer["W"], layer["b"], z)  # eq. 2
        if l < net.num_layers - 1:
            z = ACTIVATIONS[net.hidden_activations[l]].h(a)  # eq. 3
            if masks is not None:
                z = z * masks[l]
        else:
            z = output_fn(net.output)(a)
        a_list.append(a)
        z_list.append(z)
    return a_list, z_list


def _prepare(net: MLP, params: Params, x: Array, y: Array | None):
    """Convert x and float y to the parameters' dtype; give y the output's shape."""
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


def _masks_for(net, key, x):
    return dropout_masks(net, key, x.shape[:-1], x.dtype)


def mean_loss(net: MLP, a_list, z_list, y: Array) -> Array:
    """J = mean of L_i over the batch, from a forward pass's cache."""
    return jnp.mean(losses.per_example_loss(net.loss, a_list[-1], z_list[-1], y))


def _cost_impl(net: MLP, params: Params, x: Array, y: Array, masks) -> Array:
    return mean_loss(net, *forward_cache(net, params, x, masks), y)


@functools.partial(jax.jit, static_argnums=0)
def _forward(net: MLP, params: Params, x: Array, key) -> Array:
    x, _ = _prepare(net, params, x, None)
    return forward_cache(net, params, x, _masks_for(net, key, x))[1][-1]


@functools.partial(jax.jit, static_argnums=0)
def _cost(net: MLP, params: Params, x: Array, y: Array, key) -> Array:
    x, y = _prepare(net, params, x, y)
    return _cost_impl(net, params, x, y, _masks_for(net, key, x))


class HandGrads(NamedTuple):
    """What the hand-written backward pass returns."""

    J: Array  # the cost
    grads: Grads  # dJ/dparams, the structure of params
    dx: Array | None  # dJ/dx when asked for
    dy: Array | None  # dJ/dy when asked for (float targets only)


def backprop_impl(
    net: MLP,
    params: Params,
    x: Array,
    y: Array,
    masks=None,
    input_grad: bool = False,
    target_grad: bool = False,
) -> HandGrads:
    """J and its gradients by the hand-written backward pass.

    Unchecked and untransformed, for use inside compiled code: x is in the
    parameters' dtype and y went through ``_prepare``.
    """
    a_list, z_list = forward_cache(net, params, x, masks)
    a_L, yhat = a_list[-1], z_list[-1]
    J = mean_loss(net, a_list, z_list, y)
    # J is a mean over the rows of a batch: each row's delta carries 1/N.
    inv_n = 1.0 / x.shape[0] if x.ndim == 2 else 1.0
    y_dense = losses.dense_targets(net.loss, y, net.sizes[-1], yhat.dtype)
    delta_L = losses.output_delta(net.output, net.loss, a_L, yhat, y_dense)  # eq. 12
    if x.ndim == 2:
        delta_L = delta_L * jnp.asarray(inv_n, delta_L.dtype)
    grads, dx = bw.backward(
        params, a_list, z_list, delta_L, h_primes(net), masks, input_grad
    )
    dy = None
    if target_grad and jnp.issubdtype(y.dtype, jnp.floating):
        dy = losses.target_grad(net.loss, a_L, yhat, y) * jnp.asarray(inv_n, yhat.dtype)
    return HandGrads(J, grads, dx, dy)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _backprop(net: MLP, params: Params, x: Array, y: Array, key, input_grad: bool):
    x, y = _prepare(net, params, x, y)
    J, grads, dx, _ = backprop_impl(
        net, params, x, y, _masks_for(net, key, x), input_grad
    )
    return J, grads, dx


@functools.partial(jax.jit, static_argnums=0)
def _per_example(net: MLP, params: Params, x: Array, y: Array):
    x, y = _prepare(net, params, x, y)

    def one(xi, yi):
        J, grads, _, _ = backprop_impl(net, params, xi, yi)
        return J, grads

    return jax.vmap(one)(x, y)


# --- the hand backward as JAX's derivative (jax.custom_vjp) -----------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _hand_cost_vjp(net: MLP, params: Params, x: Array, y: Array, masks) -> Array:
    return _cost_impl(net, params, x, y, masks)


def _hand_cost_fwd(net, params, x, y, masks):
    J, grads, dx, dy = backprop_impl(net, params, x, y, masks, True, True)
    return J, (grads, dx, dy)


def _hand_cost_bwd(net, res, g):
    grads, dx, dy = res
    scale = lambda t: None if t is None else g * t  # noqa: E731
    return jax.tree.map(scale, grads), scale(dx), scale(dy), None


_hand_cost_vjp.defvjp(_hand_cost_fwd, _hand_cost_bwd)


@functools.partial(jax.jit, static_argnums=0)
def _hand_cost(net: MLP, params: Params, x: Array, y: Array, key) -> Array:
    x, y = _prepare(net, params, x, y)
    return _hand_cost_vjp(net, params, x, y, _masks_for(net, key, x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _hand_forward_vjp(net: MLP, params: Params, x: Array) -> Array:
    return forward_cache(net, params, x)[1][-1]


def _hand_forward_fwd(net, params, x):
    a_list, z_list = forward_cache(net, params, x)
    return z_list[-1], (params, a_list, z_list)


def _hand_forward_bwd(net, res, g):
    params, a_list, z_list = res
    delta_L = losses.output_delta_from_grad(net.output, a_list[-1], z_list[-1], g)
    grads, dx = bw.backward(params, a_list, z_list, delta_L, h_primes(net), None, True)
    return grads, dx


_hand_forward_vjp.defvjp(_hand_forward_fwd, _hand_forward_bwd)


@functools.partial(jax.jit, static_argnums=0)
def _hand_forward(net: MLP, params: Params, x: Array) -> Array:
    x, _ = _prepare(net, params, x, None)
    return _hand_forward_vjp(net, params, x)
