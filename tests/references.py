"""Independent references: jax.nn's activations and a NumPy judge of gradients.

Nothing here calls fnnet.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

REFERENCE_H = {
    "identity": lambda a: a,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "leaky_relu": lambda a: jax.nn.leaky_relu(a, negative_slope=0.01),
    "softplus": jax.nn.softplus,
    "elu": jax.nn.elu,
    "gelu": lambda a: jax.nn.gelu(a, approximate=False),
    "softmax": lambda a: jax.nn.softmax(a, axis=-1),
}


# --- an independent judge of gradients --------------------------------------------
# Tests compare the hand gradient with jax.grad (and with finite differences)
# through these few lines of NumPy, never through fnnet.relative_error or a
# fnnet.gradcheck report: a bug there must not hide a bug in the backward pass.


def rel_error(u, v) -> float:
    """||u - v||_2 / max(||u||_2, ||v||_2) in float64 NumPy; 0 when both are 0."""
    u = np.asarray(u, np.float64).ravel()
    v = np.asarray(v, np.float64).ravel()
    assert u.shape == v.shape, (u.shape, v.shape)
    scale = max(np.linalg.norm(u), np.linalg.norm(v))
    return 0.0 if scale == 0 else float(np.linalg.norm(u - v) / scale)


def max_rel_error(a, b) -> float:
    """The largest :func:`rel_error` over the leaves of two pytrees of one structure."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(
        rel_error(u, v)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def central_differences(f, params, eps=1e-6):
    """df/dparams of a scalar f by central differences, every coordinate.

    (f(theta + eps e_i) - f(theta - eps e_i)) / (2 eps) for each coordinate i,
    all 2n evaluations in one vmapped call; returns a tree shaped like params.
    """
    flat, unravel = ravel_pytree(params)
    n = flat.size
    steps = np.concatenate([np.eye(n), -np.eye(n)]) * eps
    values = np.asarray(
        jax.vmap(lambda d: f(unravel(flat + d)))(jnp.asarray(steps, flat.dtype)),
        np.float64,
    )
    return unravel(jnp.asarray((values[:n] - values[n:]) / (2 * eps), flat.dtype))
