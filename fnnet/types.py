"""Shared type aliases.

Parameters are a pytree: a tuple with one ``{"W": (M_l, M_{l-1}), "b": (M_l,)}``
dict per layer, l = 1..L (docs/derivation.md#notation: W is out x in).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax

Array = jax.Array
#: One layer: {"W": (M_l, M_{l-1}), "b": (M_l,)}.
Layer = Mapping[str, Array]
#: The network's parameters, one Layer per layer.
Params = Sequence[Layer]
#: Gradients: the same structure as Params.
Grads = Sequence[Layer]


def check_extension(kind: str, ext, required: tuple, optional: tuple = ()) -> None:
    """Check a user extension's fields: a non-empty name and callable functions.

    Args:
      kind: "Activation", "Loss" or "Block", for the message.
      ext: the extension (a frozen dataclass with a ``name``).
      required: fields that must be callable.
      optional: fields that must be callable or None.

    Raises:
      TypeError: naming the extension, the field and what it got.
    """
    if not isinstance(ext.name, str) or not ext.name:
        raise TypeError(f"{kind} name must be a non-empty str, got {ext.name!r}")
    for field in (*required, *optional):
        value = getattr(ext, field)
        if field in optional and value is None:
            continue
        if not callable(value):
            extra = " or None" if field in optional else ""
            raise TypeError(
                f"{kind} {ext.name!r}: {field} must be callable{extra}, got {value!r}"
            )
