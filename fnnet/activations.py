"""Activation functions h and their derivatives h', side by side.

Both members of a pair are functions of the pre-activation ``a``
(docs/derivation.md#activations), not of the output ``z = h(a)``: GELU's
derivative cannot be recovered from its output, and for sigmoid and tanh the
forms written in ``a`` avoid the cancellation in ``1 - z``.

Every function here is built from plain ``jax.numpy`` / ``jax.lax`` operations
(no ``custom_jvp`` helpers), so ``jax.grad`` of the forward pass differentiates
the same formulas that are written out by hand below, and the two can be held
up against each other. sigmoid and tanh use the primitives' highest-accuracy
mode, under which JAX's own derivative rules are the cancellation-free forms
used here too. Conventions at the kinks follow ``jax.nn``:

* ``relu'(0) = 0``,
* ``leaky_relu'(0) = LEAKY_SLOPE`` (the ``a > 0`` branch is the strict one),
* ``elu'(0) = ELU_ALPHA`` (equal to 1 with the default, so ELU is C^1 there).

Softmax is an output-only activation: its Jacobian is not diagonal, so it has
no elementwise ``h'``; its backward rule lives in :mod:`fnnet.losses`.

An :class:`Activation` is also a block (docs/derivation.md#blocks, eq. 16): its
``forward`` returns ``(h(a), a)`` and its ``backward`` returns
``(None, h'(a) * dz)``. Users bring their own as ``Activation(name, h, h_prime)``
and pass it wherever a name is accepted; :func:`fnnet.verify` checks ``h_prime``
against ``jax.grad`` and finite differences.

Each activation also names the initialisation of the weights that feed it
(``weight_init``, one of ``WEIGHT_INITS``; biases always start at 0):

* ``"he"``: W ~ N(0, 2 / fan_in), for the ReLU family (relu, leaky_relu,
  elu, gelu), which zero out about half of their inputs (He et al., 2015);
* ``"lecun"``: W ~ N(0, 1 / fan_in), for identity, sigmoid, tanh and
  softplus, and for the softmax output (LeCun et al., 1998);
* ``"glorot"``: W ~ N(0, 2 / (fan_in + fan_out)) (Glorot and Bengio, 2010),
  used by no built-in, offered for a user's activation.

fan_in = M_{l-1} and fan_out = M_l are the layer's input and output widths.
A user's Activation without ``weight_init`` gets ``"lecun"``, the variance
that keeps a unit-slope activation's pre-activations at unit scale.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fnnet.types import check_extension

Array = jax.Array

#: Slope of leaky ReLU for a <= 0 (same default as ``jax.nn.leaky_relu``).
LEAKY_SLOPE = 0.01
#: ELU's alpha: h(a) = alpha * (e^a - 1) for a <= 0 (same as ``jax.nn.elu``).
ELU_ALPHA = 1.0

#: Weight initialisation schemes (see the module docstring): the variance of
#: W^(l)'s entries is ``weight_gain2(scheme, fan_in, fan_out) / fan_in``.
WEIGHT_INITS = ("lecun", "he", "glorot")
#: The scheme of an activation that does not name one.
DEFAULT_WEIGHT_INIT = "lecun"

_HIGHEST = jax.lax.AccuracyMode.HIGHEST
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclasses.dataclass(frozen=True)
class Activation:
    """An elementwise activation: ``h`` and its derivative ``h_prime``, both of a.

    Args:
      name: a short name, used in messages, checkpoints and reports.
      h: the activation, applied elementwise to an array of any shape.
      h_prime: its hand-derived derivative h'(a), elementwise, same shape.
      weight_init: how :meth:`fnnet.MLP.init` draws the weights of the layer
        this activation follows (the output layer's for an output
        activation): ``"lecun"`` N(0, 1 / fan_in) (the default), ``"he"``
        N(0, 2 / fan_in) or ``"glorot"`` N(0, 2 / (fan_in + fan_out)).

    Frozen and hashable (the functions compare by identity), so a network
    holding it can be a static argument of ``jax.jit``. Define ``h`` and
    ``h_prime`` once, at module level, and reuse the same objects.

    Example::

        swish = fnnet.Activation(
            "swish",
            lambda a: a * jax.nn.sigmoid(a),
            lambda a: jax.nn.sigmoid(a) * (1 + a * jax.nn.sigmoid(-a)),
        )
        net = fnnet.MLP((4, 16, 1), activation=swish)
    """

    name: str
    h: Callable[[Array], Array]
    h_prime: Callable[[Array], Array]
    weight_init: str = DEFAULT_WEIGHT_INIT

    def __post_init__(self):
        check_extension("Activation", self, ("h", "h_prime"))
        check_weight_init("Activation", self)

    #: An activation has no parameters.
    init = None

    def forward(self, params, a: Array):
        """The block's forward: ``(h(a), cache = a)``; ``params`` is unused."""
        return self.h(a), a

    def backward(self, params, a: Array, dz: Array):
        """The block's backward (eq. 16): ``(None, h'(a) * dz)``."""
        return None, self.h_prime(a) * dz


def check_weight_init(kind: str, ext) -> None:
    """Check an extension's ``weight_init`` (an Activation's or a Block's).

    Raises:
      ValueError: naming the extension and listing ``WEIGHT_INITS``.
    """
    if ext.weight_init not in WEIGHT_INITS:
        raise ValueError(
            f"{kind} {ext.name!r}: weight_init must be one of {WEIGHT_INITS}, got "
            f"{ext.weight_init!r}"
        )


def weight_gain2(scheme: str, fan_in: int, fan_out: int) -> float:
    """gain^2 of a scheme, W ~ N(0, gain^2 / fan_in): lecun 1, he 2, glorot
    2 fan_in / (fan_in + fan_out) (so its variance is 2 / (fan_in + fan_out))."""
    if scheme == "he":
        return 2.0
    if scheme == "glorot":
        return 2.0 * fan_in / (fan_in + fan_out)
    return 1.0


def identity(a: Array) -> Array:
    return a


def identity_prime(a: Array) -> Array:
    return jnp.ones_like(a)


def _logistic(a: Array) -> Array:
    return jax.lax.logistic(a, accuracy=_HIGHEST)


def sigmoid(a: Array) -> Array:
    """sigma(a) = 1 / (1 + e^-a), the ``logistic`` primitive at highest accuracy."""
    return _logistic(a)


def sigmoid_prime(a: Array) -> Array:
    """sigma'(a) = sigma(a) (1 - sigma(a)), written as sigma(a) sigma(-a).

    ``1 - sigma(a)`` loses every digit once sigma(a) rounds to 1 (a > 17 in
    float32); ``sigma(-a)`` keeps full relative precision for any a. JAX
    differentiates the highest-accuracy ``logistic`` with the same product.
    """
    return _logistic(a) * _logistic(-a)


def tanh(a: Array) -> Array:
    return jax.lax.tanh(a, accuracy=_HIGHEST)


def tanh_prime(a: Array) -> Array:
    """tanh'(a) = 1 - tanh(a)^2, written as 4 sigma(2a) sigma(-2a).

    ``1 - tanh(a)^2`` cancels: in float32 it is off by 5e-4 (relative) at
    a = 5 and is 0 from a = 9 on. The logistic form keeps full relative
    precision everywhere; JAX differentiates the highest-accuracy ``tanh``
    with the same expression.
    """
    return 4.0 * (_logistic(2.0 * a) * _logistic(-2.0 * a))


def relu(a: Array) -> Array:
    return jnp.where(a > 0, a, 0.0)


def relu_prime(a: Array) -> Array:
    """1[a > 0]; 0 at a = 0, the convention of ``jax.nn.relu``."""
    return jnp.where(a > 0, 1.0, 0.0).astype(a.dtype)


def leaky_relu(a: Array) -> Array:
    return jnp.where(a > 0, a, LEAKY_SLOPE * a)


def leaky_relu_prime(a: Array) -> Array:
    """1 if a > 0 else LEAKY_SLOPE."""
    return jnp.where(a > 0, 1.0, LEAKY_SLOPE).astype(a.dtype)


def softplus(a: Array) -> Array:
    """log(1 + e^a), as a + log1p(e^-a) for a > 0 and log1p(e^a) otherwise.

    Neither branch overflows, and each ``where`` branch only ever sees its own
    side of 0, so ``jax.grad`` gets sigma(a) everywhere, 1/2 at a = 0 (the
    form ``max(a, 0) + log1p(e^-|a|)`` would give 0 there: JAX differentiates
    max and |a| one-sidedly at the kink).
    """
    pos = jnp.where(a > 0, a, 0.0)
    neg = jnp.where(a > 0, 0.0, a)
    return jnp.where(a > 0, pos + jnp.log1p(jnp.exp(-pos)), jnp.log1p(jnp.exp(neg)))


def softplus_prime(a: Array) -> Array:
    """softplus'(a) = sigma(a)."""
    return _logistic(a)


def elu(a: Array) -> Array:
    # expm1 only ever sees a <= 0: for large positive a the unused branch would
    # be inf, and under jax.grad 0 * inf in that branch would give NaN. (A
    # ``where`` rather than ``minimum``, whose derivative at 0 is 1/2.)
    return jnp.where(a > 0, a, ELU_ALPHA * jnp.expm1(jnp.where(a > 0, 0.0, a)))


def elu_prime(a: Array) -> Array:
    """1 if a > 0 else ELU_ALPHA e^a."""
    return jnp.where(a > 0, 1.0, ELU_ALPHA * jnp.exp(jnp.where(a > 0, 0.0, a)))


def _std_normal_cdf(a: Array) -> Array:
    # Phi(a) = erfc(-a / sqrt 2) / 2: accurate in the left tail, where
    # (1 + erf(a / sqrt 2)) / 2 would cancel.
    return 0.5 * jax.lax.erfc(-a * _SQRT_HALF)


def gelu(a: Array) -> Array:
    """GELU, exact (erf) form: a Phi(a), Phi the standard normal CDF."""
    return a * _std_normal_cdf(a)


def gelu_prime(a: Array) -> Array:
    """Phi(a) + a phi(a), phi the standard normal density."""
    return _std_normal_cdf(a) + a * (_INV_SQRT_2PI * jnp.exp(-0.5 * jnp.square(a)))


ACTIVATIONS: dict[str, Activation] = {
    act.name: act
    for act in (
        Activation("identity", identity, identity_prime, weight_init="lecun"),
        Activation("sigmoid", sigmoid, sigmoid_prime, weight_init="lecun"),
        Activation("tanh", tanh, tanh_prime, weight_init="lecun"),
        Activation("relu", relu, relu_prime, weight_init="he"),
        Activation("leaky_relu", leaky_relu, leaky_relu_prime, weight_init="he"),
        Activation("softplus", softplus, softplus_prime, weight_init="lecun"),
        Activation("elu", elu, elu_prime, weight_init="he"),
        Activation("gelu", gelu, gelu_prime, weight_init="he"),
    )
}

#: Names accepted for hidden layers.
HIDDEN_ACTIVATIONS = tuple(ACTIVATIONS)
#: Names accepted for the output layer: every elementwise activation, and softmax.
OUTPUT_ACTIVATIONS = (*ACTIVATIONS, "softmax")


def softmax(a: Array) -> Array:
    """softmax over the last axis, shifted by the max so that e^a never overflows."""
    e = jnp.exp(a - jax.lax.stop_gradient(jnp.max(a, axis=-1, keepdims=True)))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def output_fn(output: str | Activation) -> Callable[[Array], Array]:
    """The function ``h^(L)`` of an output activation (a name or an Activation)."""
    if isinstance(output, Activation):
        return output.h
    return softmax if output == "softmax" else ACTIVATIONS[output].h


def get(spec: str | Activation, *, output: bool = False) -> Activation | str:
    """The :class:`Activation` a name or object stands for.

    Args:
      spec: a built-in name (see ``HIDDEN_ACTIVATIONS``) or an ``Activation``.
      output: allow ``"softmax"`` (returned as the string: it is not elementwise).

    Raises:
      ValueError: for an unknown name, listing the supported ones.
      TypeError: for anything that is neither a name nor an ``Activation``.
    """
    if isinstance(spec, Activation):
        return spec
    role = "output" if output else "activation"
    if not isinstance(spec, str):
        raise TypeError(
            f"{role} must be a name or an fnnet.Activation, got {type(spec).__name__} "
            f"{spec!r}"
        )
    if output and spec == "softmax":
        return spec
    if spec not in ACTIVATIONS:
        names = OUTPUT_ACTIVATIONS if output else HIDDEN_ACTIVATIONS
        raise ValueError(
            f"{role} {spec!r} is not supported; choose one of {names} or pass an "
            "fnnet.Activation(name, h, h_prime)"
        )
    return ACTIVATIONS[spec]


def name_of(spec) -> str:
    """The name of an activation, loss or block given by name or object."""
    return spec if isinstance(spec, str) else spec.name
