"""Per-example losses L_i and the output error signal delta^(L).

See docs/derivation.md#output-deltas (eqs. 5-7) and #losses.

Every function works on one example (vectors of shape (K,)) or on a batch
(rows of shape (N, K)); the loss is summed over the last axis, so it returns
shape () or (N,). The cost J is the mean of L_i over the batch (eq. 3).

Three output/loss pairs are *canonical*: for them the output delta is simply

    delta^(L) = yhat - y

identity + mse:       L = 1/2 ||yhat - y||^2,          h' = 1
sigmoid + bce:        L = -[y log yhat + (1-y) log(1-yhat)], and sigma' = yhat(1-yhat)
                      cancels the 1/(yhat(1-yhat)) of dL/dyhat
softmax + cross_entropy: L = -sum_k y_k log yhat_k with sum_k y_k = 1, and the
                      softmax Jacobian diag(yhat) - yhat yhat^T folds dL/dyhat
                      = -y / yhat into yhat - y

Their values are computed from the logits a^(L) (softplus, log-sum-exp) and
their deltas never form ``log yhat``, so logits of any size give finite results.

Any other pair goes through the general rules with g = dL_i/dyhat:

    elementwise h:  delta^(L) = h'(a^(L)) * g                  (eq. 5)
    softmax:        delta^(L) = yhat * (g - <g, yhat>)         (eq. 6)

``bce`` is only defined for a sigmoid output and ``cross_entropy`` only for a
softmax output (their values need probabilities in (0, 1) that the other
outputs do not give); ``mse`` works with every output.

A user's loss is a :class:`Loss` ``(name, value, grad)``: the per-example value
L_i(yhat, y) and its hand-derived g = dL_i/dyhat. It goes through the general
rules above, with any output activation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fnnet import errors
from fnnet.activations import ACTIVATIONS, Activation
from fnnet.types import check_extension

Array = jax.Array

LOSSES = ("mse", "bce", "cross_entropy")


@dataclasses.dataclass(frozen=True)
class Loss:
    """A per-example loss L_i(yhat, y) with its hand-derived gradient in yhat.

    Args:
      name: a short name, used in messages, checkpoints and reports.
      value: ``value(yhat, y)`` -> L_i, reducing the last axis: (..., K) -> (...).
      grad: ``grad(yhat, y)`` -> g = dL_i/dyhat, shaped like yhat. The output
        delta is then h'(a) * g (eq. 5), or yhat * (g - <g, yhat>) (eq. 6)
        for a softmax output.
      target_grad: optional ``target_grad(yhat, y)`` -> dL_i/dy, needed only
        when :meth:`fnnet.MLP.hand_cost` is differentiated with respect to y;
        without it that derivative is NaN (never a silent zero).

    Targets are floating and shaped like the output. Frozen and hashable.

    Example::

        DELTA = 1.0
        huber = fnnet.Loss(
            "huber",
            lambda yhat, y: jnp.sum(optax.huber_loss(yhat, y, DELTA), axis=-1),
            lambda yhat, y: jnp.clip(yhat - y, -DELTA, DELTA),
        )
        net = fnnet.MLP((4, 16, 1), loss=huber)
    """

    name: str
    value: Callable[[Array, Array], Array]
    grad: Callable[[Array, Array], Array]
    target_grad: Callable[[Array, Array], Array] | None = None

    def __post_init__(self):
        check_extension("Loss", self, ("value", "grad"), ("target_grad",))


def get(spec: str | Loss) -> str | Loss:
    """A built-in loss name, or a user's :class:`Loss`, checked."""
    if isinstance(spec, Loss):
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"loss must be a name or an fnnet.Loss, got {type(spec).__name__} {spec!r}"
        )
    if spec not in LOSSES:
        raise ValueError(
            f"loss {spec!r} is not supported; choose one of {LOSSES} or pass an "
            "fnnet.Loss(name, value, grad)"
        )
    return spec


#: The output each loss needs, or None when any output will do.
REQUIRED_OUTPUT = {"mse": None, "bce": "sigmoid", "cross_entropy": "softmax"}

CANONICAL_PAIRS = (
    ("identity", "mse"),
    ("sigmoid", "bce"),
    ("softmax", "cross_entropy"),
)


def logsumexp(a: Array) -> Array:
    """log sum_k e^{a_k} over the last axis, shifted by the max (no overflow)."""
    m = jax.lax.stop_gradient(jnp.max(a, axis=-1))
    return m + jnp.log(jnp.sum(jnp.exp(a - m[..., None]), axis=-1))


def one_hot(labels: Array, num_classes: int, dtype) -> Array:
    """Integer labels (...,) to one-hot rows (..., num_classes) in ``dtype``.

    A label outside [0, num_classes) gives a row of NaN, so the loss and both
    gradients (hand-written and ``jax.grad``) of that example are NaN: under
    ``jit``, where labels cannot be checked, an invalid label is never a
    plausible number. Under :func:`fnnet.checked` it raises instead.
    """
    classes = jnp.arange(num_classes, dtype=labels.dtype)
    classes = classes.reshape((1,) * labels.ndim + (num_classes,))
    rows = (labels[..., None] == classes).astype(dtype)
    valid = (labels >= 0) & (labels < num_classes)
    errors.value_check(
        jnp.all(valid),
        f"y holds labels outside [0, {num_classes}) for {num_classes} output "
        "units, e.g. {label}",
        label=jnp.where(valid, -1, labels).ravel()[jnp.argmin(valid.ravel())],
    )
    return jnp.where(valid[..., None], rows, jnp.asarray(jnp.nan, dtype))


def dense_targets(loss: str, y: Array, num_outputs: int, dtype) -> Array:
    """Targets with the output's shape: one-hot for integer cross-entropy labels."""
    if loss == "cross_entropy" and jnp.issubdtype(y.dtype, jnp.integer):
        return one_hot(y, num_outputs, dtype)
    return y


def per_example_loss(loss: str, a: Array, yhat: Array, y: Array) -> Array:
    """L_i for each example, shape ``a.shape[:-1]``.

    Args:
      loss: "mse", "bce", "cross_entropy", or a :class:`Loss`.
      a: (..., K) output pre-activation a^(L) (logits).
      yhat: (..., K) output h^(L)(a^(L)).
      y: (..., K) float targets, or (...,) integer labels for cross_entropy.
    """
    if isinstance(loss, Loss):
        return loss.value(yhat, y)
    if loss == "mse":
        return 0.5 * jnp.sum(jnp.square(yhat - y), axis=-1)
    if loss == "bce":
        # -[y log sigma(a) + (1-y) log(1 - sigma(a))] = softplus(a) - y a
        return jnp.sum(ACTIVATIONS["softplus"].h(a) - y * a, axis=-1)
    if loss == "cross_entropy":
        # -sum_k y_k log softmax(a)_k, with log softmax(a) = a - logsumexp(a)
        # Integer labels go through one_hot, as in the hand delta, so that an
        # invalid label gives NaN here too (indexing would wrap or clamp).
        lse = logsumexp(a)
        y = dense_targets(loss, y, a.shape[-1], a.dtype)
        return jnp.sum(y * (lse[..., None] - a), axis=-1)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def loss_grad_wrt_yhat(loss: str | Loss, yhat: Array, y: Array) -> Array:
    """g = dL_i/dyhat, for the losses that allow a non-canonical output."""
    if isinstance(loss, Loss):
        return loss.grad(yhat, y)
    if loss == "mse":
        return yhat - y
    raise ValueError(f"loss {loss!r} has only its canonical output pair")


def output_delta_from_grad(
    output: str | Activation, a: Array, yhat: Array, g: Array
) -> Array:
    """delta^(L) = dL/da^(L) from g = dL/dyhat, for any output (eqs. 5, 6).

    Args:
      output: the output activation h^(L), a name or an Activation.
      a: (..., K) pre-activation a^(L).
      yhat: (..., K) output h^(L)(a^(L)).
      g: (..., K) dL/dyhat.
    """
    if isinstance(output, Activation):
        return output.h_prime(a) * g  # eq. 5
    if output == "softmax":
        # J_softmax g = diag(yhat) g - yhat yhat^T g (eq. 6)
        return yhat * (g - jnp.sum(g * yhat, axis=-1, keepdims=True))
    return ACTIVATIONS[output].h_prime(a) * g  # eq. 5, diag(h'(a)) g as a product


def is_canonical(output, loss) -> bool:
    """Whether (output, loss) is a canonical pair, whose delta is yhat - y (eq. 7)."""
    return isinstance(output, str) and (output, loss) in CANONICAL_PAIRS


def output_delta(
    output: str | Activation, loss: str | Loss, a: Array, yhat: Array, y: Array
) -> Array:
    """delta^(L) = dL_i/da^(L) per example (eqs. 5-7).

    Args:
      output: the output activation h^(L), a name or an Activation.
      loss: the per-example loss, a name or a Loss.
      a: (..., K) pre-activation a^(L).
      yhat: (..., K) output h^(L)(a^(L)).
      y: (..., K) targets (dense: integer labels already one-hot).

    Returns:
      (..., K) delta^(L), not yet divided by the batch size.
    """
    if is_canonical(output, loss):
        return yhat - y  # eq. 7
    return output_delta_from_grad(output, a, yhat, loss_grad_wrt_yhat(loss, yhat, y))


def target_grad(loss: str | Loss, a: Array, yhat: Array, y: Array) -> Array:
    """dL_i/dy for float targets (used when y itself is differentiated).

    A user's :class:`Loss` without ``target_grad`` gives NaN: it has no
    hand-derived dL/dy, and a silent zero would be wrong.
    """
    if isinstance(loss, Loss):
        if loss.target_grad is None:
            return jnp.full_like(yhat, jnp.nan)
        return loss.target_grad(yhat, y)
    if loss == "mse":
        return y - yhat
    if loss == "bce":
        return -a
    # cross_entropy with probability rows: dL/dy_k = -log softmax(a)_k
    return logsumexp(a)[..., None] - a
