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
