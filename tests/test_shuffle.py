"""The epoch's order: fnnet.shuffle.permutation.

Small sets keep ``jax.random.permutation``'s order exactly; larger ones use a
keyed Feistel bijection. The checks: it is a permutation, a function of the
key alone, and its positions and neighbours look independent (chi-square
tests with thresholds far in the tail, so they fail only for real structure,
e.g. an affine map or the identity).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnnet import shuffle, train

permutation = jax.jit(shuffle.permutation, static_argnums=1)


def _chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def _tail(dof: int) -> float:
    # mean dof, std sqrt(2 dof): 6 standard deviations out is p < 1e-6
    return dof + 6 * np.sqrt(2 * dof)


@pytest.mark.parametrize("n", [1, 2, 3, 100, shuffle.SORT_ROWS])
def test_small_sets_keep_jax_random_permutations_order(n):
    key = jax.random.key(7)
    got = permutation(key, n)
    assert got.dtype == jnp.uint32
    np.testing.assert_array_equal(got, jax.random.permutation(key, n))


@pytest.mark.parametrize("n", [shuffle.SORT_ROWS + 1, 5000, 8192, 8193, 2**17 - 1])
def test_large_sets_get_a_permutation_of_every_row(n):
    got = np.asarray(permutation(jax.random.key(n), n))
    assert got.dtype == np.uint32 and got.shape == (n,)
    np.testing.assert_array_equal(np.sort(got), np.arange(n))
    assert not np.array_equal(got, np.arange(n))


def test_feistel_is_a_bijection_of_its_bit_range():
    keys = jax.random.bits(jax.random.key(0), (shuffle.ROUNDS,), jnp.uint32)
    feistel = jax.jit(shuffle.feistel, static_argnums=2)
    for bits in (2, 3, 4, 7, 12):  # even and odd widths, the smallest included
        x = jnp.arange(2**bits, dtype=jnp.uint32)
        y = np.asarray(feistel(x, keys, bits))
        np.testing.assert_array_equal(np.sort(y), np.arange(2**bits))


def test_the_order_is_a_function_of_the_key():
    n = 10_000
    a = permutation(jax.random.key(1), n)
    np.testing.assert_array_equal(a, permutation(jax.random.key(1), n))
    np.testing.assert_array_equal(a, shuffle.permutation(jax.random.key(1), n))
    b = permutation(jax.random.key(2), n)
    assert np.mean(np.asarray(a) == np.asarray(b)) < 0.01


def test_positions_and_neighbours_look_independent():
    n, bins = 2**16 + 3, 16  # 17 bits: the two halves have unequal widths
    perm = np.asarray(permutation(jax.random.key(11), n)).astype(np.int64)
    pos_bin = np.arange(n) * bins // n
    val_bin = perm * bins // n
    # Where a row lands does not depend on where it started ...
    table = np.zeros((bins, bins))
    np.add.at(table, (pos_bin, val_bin), 1)
    assert _chi_square(table) < _tail(bins * bins - 1)
    # ... and consecutive rows of the order are unrelated (an affine map
    # x -> a x + c would put every pair in a few cells).
    pairs = np.zeros((bins, bins))
    np.add.at(pairs, (val_bin[:-1], val_bin[1:]), 1)
    assert _chi_square(pairs) < _tail(bins * bins - 1)
    # ... and neither are the steps between them, modulo n.
    steps = np.bincount((np.diff(perm) % n) * 64 // n, minlength=64)
    assert _chi_square(steps) < _tail(63)


def test_across_keys_a_row_lands_anywhere_and_its_neighbour_elsewhere():
    n, keys, bins = 5000, 400, 10
    split = jax.random.split(jax.random.key(3), keys)
    perms = np.stack([np.asarray(permutation(k, n)) for k in split])
    where = np.argsort(perms, axis=1)  # where[k, i]: the position of row i
    for row in (0, 1, n - 1):
        counts = np.bincount(where[:, row] * bins // n, minlength=bins)
        assert _chi_square(counts) < _tail(bins - 1)
    r = np.corrcoef(where[:, 0], where[:, 1])[0, 1]
    assert abs(r) < 6 / np.sqrt(keys)


def test_an_epoch_above_the_sort_size_takes_each_row_at_most_once():
    n, B = shuffle.SORT_ROWS + 1000, 256
    perm = np.asarray(train.epoch_permutation(jax.random.key(5), n, B))
    assert perm.shape == (n // B, B)
    assert len(np.unique(perm)) == perm.size


def test_more_than_uint32_rows_is_refused():
    with pytest.raises(ValueError, match="below 2\\*\\*32"):
        shuffle.permutation(jax.random.key(0), 2**32)
