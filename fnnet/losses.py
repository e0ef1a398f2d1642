"""Per-example losses L_i and the output error signal delta^(L) (DERIVATION eq. 12).

Every function works on one example (vectors of shape (K,)) or on a batch
(rows of shape (N, K)); the loss is summed over the last axis, so it returns
shape () or (N,). The cost J is the mean of L_i over the batch (seed 001, 003).

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

    elementwise h:  delta^(L) = h'(a^(L)) * g                  (eq. 12)
    softmax:        delta^(L) = yhat * (g - <g, yhat>)         (Jacobian-vector form)

``bce`` is only defined for a sigmoid output and ``cross_entropy`` only for a
softmax output (their values need probabilities in (0, 1) that the other
outputs do not give); ``mse`` works with every output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fnnet.activations import ACTIVATIONS

Array = jax.Array

LOSSES = ("mse", "bce", "cross_entropy")

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
    """Integer labels (...,) to one-hot rows (..., num_classes) in ``dtype``."""
    classes = jnp.arange(num_classes, dtype=labels.dtype)
    classes = classes.reshape((1,) * labels.ndim + (num_classes,))
    return (labels[..., None] == classes).astype(dtype)


def dense_targets(loss: str, y: Array, num_outputs: int, dtype) -> Array:
    """Targets with the output's shape: one-hot for integer cross-entropy labels."""
    if loss == "cross_entropy" and jnp.issubdtype(y.dtype, jnp.integer):
        return one_hot(y, num_outputs, dtype)
    return y


def per_example_loss(loss: str, a: Array, yhat: Array, y: Array) -> Array:
    """L_i for each example, shape ``a.shape[:-1]``.

    Args:
      loss: "mse", "bce" or "cross_entropy".
      a: (..., K) output pre-activation a^(L) (logits).
      yhat: (..., K) output h^(L)(a^(L)).
      y: (..., K) float targets, or (...,) integer labels for cross_entropy.
    """
    if loss == "mse":
        return 0.5 * jnp.sum(jnp.square(yhat - y), axis=-1)
    if loss == "bce":
        # -[y log sigma(a) + (1-y) log(1 - sigma(a))] = softplus(a) - y a
        return jnp.sum(ACTIVATIONS["softplus"].h(a) - y * a, axis=-1)
    if loss == "cross_entropy":
        # -sum_k y_k log softmax(a)_k, with log softmax(a) = a - logsumexp(a)
        lse = logsumexp(a)
        if jnp.issubdtype(y.dtype, jnp.integer):
            return lse - jnp.take_along_axis(a, y[..., None], axis=-1)[..., 0]
        return jnp.sum(y * (lse[..., None] - a), axis=-1)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def loss_grad_wrt_yhat(loss: str, yhat: Array, y: Array) -> Array:
    """g = dL_i/dyhat, for the losses that allow a non-canonical output (mse)."""
    if loss == "mse":
        return yhat - y
    raise ValueError(f"loss {loss!r} has only its canonical output pair")


def output_delta_from_grad(output: str, a: Array, yhat: Array, g: Array) -> Array:
    """delta^(L) = dL/da^(L) from g = dL/dyhat, for any output (general rules).

    Args:
      output: name of the output activation h^(L).
      a: (..., K) pre-activation a^(L).
      yhat: (..., K) output h^(L)(a^(L)).
      g: (..., K) dL/dyhat.
    """
    if output == "softmax":
        # J_softmax g = diag(yhat) g - yhat yhat^T g
        return yhat * (g - jnp.sum(g * yhat, axis=-1, keepdims=True))
    return ACTIVATIONS[output].h_prime(a) * g  # eq. 12, diag(h'(a)) g as a product


def output_delta(output: str, loss: str, a: Array, yhat: Array, y: Array) -> Array:
    """delta^(L) = dL_i/da^(L) per example (DERIVATION eq. 12 and its table).

    Args:
      output: name of the output activation h^(L).
      loss: name of the per-example loss.
      a: (..., K) pre-activation a^(L).
      yhat: (..., K) output h^(L)(a^(L)).
      y: (..., K) targets (dense: integer labels already one-hot).

    Returns:
      (..., K) delta^(L), not yet divided by the batch size.
    """
    if (output, loss) in CANONICAL_PAIRS:
        return yhat - y
    return output_delta_from_grad(output, a, yhat, loss_grad_wrt_yhat(loss, yhat, y))


def target_grad(loss: str, a: Array, yhat: Array, y: Array) -> Array:
    """dL_i/dy for float targets (used when y itself is differentiated)."""
    if loss == "mse":
        return y - yhat
    if loss == "bce":
        return -a
    # cross_entropy with probability rows: dL/dy_k = -log softmax(a)_k
    return logsumexp(a)[..., None] - a
