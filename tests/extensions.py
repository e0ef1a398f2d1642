"""User extensions written the way a user would, some deliberately wrong.

Shared by the tests (imported as ``extensions``); nothing in fnnet imports it.
The test session raises on implicit rank promotion, so parameters of shape
(M,) are broadcast to the rows explicitly (``rowwise``).
"""

import jax
import jax.numpy as jnp

import fnnet
from fnnet.blocks import sum_rows


def _sigmoid(a):
    return 1.0 / (1.0 + jnp.exp(-a))


def swish(a):
    return a * _sigmoid(a)


def swish_prime(a):
    # d/da [a s(a)] = s(a) + a s(a) s(-a) = s(a) (1 + a s(-a))
    return _sigmoid(a) * (1.0 + a * _sigmoid(-a))


def swish_prime_missing_term(a):
    return _sigmoid(a)  # forgot the a s(a) s(-a) term


SWISH = fnnet.Activation("swish", swish, swish_prime)
BAD_SWISH = fnnet.Activation("bad_swish", swish, swish_prime_missing_term)

HUBER_DELTA = 1.0


def huber_value(yhat, y):
    r = jnp.abs(yhat - y)
    quad = 0.5 * jnp.square(r)
    lin = HUBER_DELTA * (r - 0.5 * HUBER_DELTA)
    return jnp.sum(jnp.where(r <= HUBER_DELTA, quad, lin), axis=-1)


def huber_grad(yhat, y):
    return jnp.clip(yhat - y, -HUBER_DELTA, HUBER_DELTA)


def huber_target_grad(yhat, y):
    return -huber_grad(yhat, y)


def huber_grad_unclipped(yhat, y):
    return yhat - y  # right only inside |r| <= delta


HUBER = fnnet.Loss("huber", huber_value, huber_grad, huber_target_grad)
HUBER_NO_TARGET_GRAD = fnnet.Loss("huber_no_dy", huber_value, huber_grad)
BAD_HUBER = fnnet.Loss("bad_huber", huber_value, huber_grad_unclipped)

LN_EPS = 1e-5


def rowwise(v, like):
    """A (M,) parameter broadcast to the rows of ``like`` ((M,) or (N, M))."""
    return jnp.broadcast_to(v, like.shape)


def ln_forward(p, x):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    inv = 1.0 / jnp.sqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + LN_EPS)
    xhat = xc * inv
    return rowwise(p["gamma"], x) * xhat + rowwise(p["beta"], x), (xhat, inv)


def ln_backward(p, cache, dy):
    xhat, inv = cache
    dxhat = dy * rowwise(p["gamma"], dy)
    mean = lambda t: jnp.mean(t, axis=-1, keepdims=True)  # noqa: E731
    dx = inv * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    return {"gamma": sum_rows(dy * xhat, 1), "beta": sum_rows(dy, 1)}, dx


def ln_backward_no_centering(p, cache, dy):
    xhat, inv = cache
    grads, _ = ln_backward(p, cache, dy)
    return grads, inv * dy * rowwise(p["gamma"], dy)  # mean, variance held fixed


def ln_init(key, width, dtype):
    return {"gamma": jnp.ones(width, dtype), "beta": jnp.zeros(width, dtype)}


LAYER_NORM = fnnet.Block("layer_norm", ln_forward, ln_backward, ln_init)
BAD_LAYER_NORM = fnnet.Block(
    "bad_layer_norm", ln_forward, ln_backward_no_centering, ln_init
)


def res_forward(p, x):
    u = x @ p["V"].T + rowwise(p["c"], x)
    return x + jnp.where(u > 0, u, 0.0), (x, u)


def res_backward(p, cache, dy):
    x, u = cache
    du = jnp.where(u > 0, dy, 0.0)
    rows = tuple(range(du.ndim - 1))
    dV = jnp.tensordot(du, x, axes=(rows, rows))
    return {"V": dV, "c": sum_rows(du, 1)}, dy + du @ p["V"]


def res_backward_no_skip(p, cache, dy):
    grads, dx = res_backward(p, cache, dy)
    return grads, dx - dy  # forgot the identity path


def res_init(key, width, dtype):
    V = jax.random.normal(key, (width, width), dtype) / width**0.5
    return {"V": V, "c": jnp.zeros(width, dtype)}


RESIDUAL = fnnet.Block("residual", res_forward, res_backward, res_init)
BAD_RESIDUAL = fnnet.Block("bad_residual", res_forward, res_backward_no_skip, res_init)
