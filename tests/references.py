"""Independent references for the activations: jax.nn's own functions, not fnnet's."""

import jax
import jax.numpy as jnp

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
