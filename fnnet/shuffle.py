"""The order of an epoch: a random permutation of the rows, in O(N) work.

``jax.random.permutation`` shuffles by sorting random keys, several rounds of
them. XLA's CPU sort costs about half a microsecond per element, so at a
batch of 256 the shuffle cost as much as the training step itself, and more
per step as N grew (O(N log N) work for N / B steps): measured on a 2-core
CPU, 5.2 s an epoch at 4,000,000 rows (330 µs a step, the step itself
150 µs). :func:`permutation` keeps that sort for small sets and, above
:data:`SORT_ROWS` rows, computes the permutation as a keyed bijection of the
row numbers instead, with no sort:

* A Feistel network on ``b``-bit integers, ``2**b`` the smallest power of
  two >= N: each round splits ``x`` into a high part ``L`` and a low part
  ``R`` and forms ``x' = R . (L xor F(R))`` (``.`` joins the bits), which is
  invertible for ANY round function ``F`` (``L = low part xor F(R)``). ``F``
  hashes ``R`` with a 32-bit round key drawn from ``key``;
  :data:`ROUNDS` rounds alternate the two halves' widths.
* Cycle walking keeps it in range: a row number ``i < N`` is mapped again
  and again until the value falls below N. The bijection's cycles pass
  through ``[0, N)``, so this is a bijection of ``[0, N)`` (the standard
  construction of format-preserving encryption, as in TensorFlow's
  ``index_shuffle``). ``2**b < 2N``, so fewer than half the values need a
  second step and the loop ends after about ``log2 N`` passes.

Every element is independent of the others, so the work is a few integer
operations per row (57 ms at 4,000,000 rows, same machine) and vectorizes,
on any backend, with bit-identical results everywhere. It is a pseudo-random
permutation, not a uniform draw over all N! orders (neither is any shuffle
driven by a 64-bit key); the statistical checks are in
``tests/test_shuffle.py``.

Up to :data:`SORT_ROWS` rows the order is exactly
``jax.random.permutation(key, n)``: a sort is cheap there, and that is where
a Feistel network on a few bits is furthest from uniform. Every bundled data
set is that small, so their results are those of earlier fnnet versions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fnnet.types import Array

#: Up to this many rows, :func:`permutation` is ``jax.random.permutation``.
SORT_ROWS = 4096
#: Feistel rounds above :data:`SORT_ROWS` (four make a strong pseudo-random
#: permutation from random round functions; two more are cheap insurance).
ROUNDS = 6

_U32 = jnp.uint32


def _hash32(x: Array) -> Array:
    """A bijective 32-bit integer mix (xor-shift / multiply, "lowbias32")."""
    x = x ^ (x >> 16)
    x = x * _U32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * _U32(0x846CA68B)
    return x ^ (x >> 16)


def feistel(x: Array, round_keys: Array, bits: int) -> Array:
    """A bijection of ``[0, 2**bits)`` applied to every element of uint32 ``x``.

    ``round_keys``: uint32 of shape (rounds,). ``bits`` >= 2.
    """
    low = bits // 2  # the width of R in this round; the widths alternate
    for r in range(round_keys.shape[0]):
        high = bits - low
        L, R = x >> low, x & _U32((1 << low) - 1)
        f = _hash32(R ^ round_keys[r]) & _U32((1 << high) - 1)
        x = (R << high) | (L ^ f)
        low = high
    return x


def permutation(key: Array, n: int) -> Array:
    """A permutation of ``range(n)`` drawn from ``key``, as uint32 of shape (n,).

    ``jax.random.permutation(key, n)`` for ``n <= SORT_ROWS``; above, a keyed
    Feistel bijection with cycle walking (see the module's docstring). ``n``
    is static (below 2**32); the result is the same on every backend.
    """
    if n <= SORT_ROWS:
        return jax.random.permutation(key, n).astype(_U32)
    if n >= 2**32:
        raise ValueError(f"n must be below 2**32 rows (uint32 indices), got {n}")
    bits = (n - 1).bit_length()
    round_keys = jax.random.bits(key, (ROUNDS,), _U32)
    bound = _U32(n)

    def outside(y):
        return jnp.any(y >= bound)

    def again(y):
        return jnp.where(y >= bound, feistel(y, round_keys, bits), y)

    start = feistel(jnp.arange(n, dtype=_U32), round_keys, bits)
    return jax.lax.while_loop(outside, again, start)
