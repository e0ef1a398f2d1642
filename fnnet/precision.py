"""Matrix-product precision: one explicit setting for every product of a network.

JAX's ``precision`` of a matrix product chooses how float32 operands are
multiplied. On a CPU every choice computes in float32. On an NVIDIA GPU
(Ampere and later) the default lets cuBLAS round float32 operands to TF32
(10 mantissa bits, relative rounding about 5e-4) before multiplying, which
is several times faster on large products and agrees with float32 only to
about 1e-3 per entry. Float64 products are float64 on every platform.

The choices, by name (what :class:`fnnet.MLP` accepts, besides
``jax.lax.Precision`` members):

* ``None``: the platform default; a process-wide
  ``jax.config.update("jax_default_matmul_precision", ...)`` still applies.
* ``"default"``: ``Precision.DEFAULT``: the fastest, TF32 on NVIDIA GPUs.
* ``"high"``: ``Precision.HIGH``: three bfloat16 passes (about bfloat16x3,
  close to float32) on GPUs and TPUs.
* ``"highest"``: ``Precision.HIGHEST``: full float32.

:func:`check` validates a value once at the front and returns its name,
which ``jax.lax.dot_general`` and ``jnp.matmul`` take as their
``precision``; :func:`scope` applies it to products that fnnet does not
write itself (a user's :class:`fnnet.Block`).
"""

from __future__ import annotations

import contextlib

import jax

#: The names accepted for a network's matrix-product precision.
PRECISIONS = ("default", "high", "highest")
#: The precision that gradient checks use unless told otherwise: a check at
#: TF32 would measure TF32's rounding, not the derivation.
CHECK_PRECISION = "highest"


def check(value, name: str = "precision") -> str | None:
    """The name of a precision setting, or None for the platform default.

    Args:
      value: None, one of :data:`PRECISIONS`, or a ``jax.lax.Precision``.
      name: the argument's name, for the message.

    Raises:
      ValueError: for any other value, naming the argument, the choices and
        the value received.
    """
    if value is None:
        return None
    if isinstance(value, jax.lax.Precision):
        return value.name.lower()
    if isinstance(value, str) and value in PRECISIONS:
        return value
    raise ValueError(
        f"{name} must be None, one of {', '.join(map(repr, PRECISIONS))} or a "
        f"jax.lax.Precision, got {value!r}"
    )


def scope(value: str | None):
    """A context in which products without their own precision use ``value``.

    ``jax.default_matmul_precision`` for a name; nothing for None.
    """
    if value is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(value)


def describe(value: str | None) -> str:
    """How a report names the precision: the name, or "platform default"."""
    return "platform default" if value is None else value
