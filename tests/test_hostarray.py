"""Aligned host arrays: the CPU backend uses them in place (fnnet.hostarray)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet
from fnnet import hostarray, train
from fnnet.data import load_dataset

on_cpu = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="host memory is shared on the CPU only"
)


@pytest.mark.parametrize(
    "shape, dtype",
    [((1000, 7), np.float32), ((3,), np.float64), ((0, 5), np.float32), ((), np.int32)],
)
def test_empty_is_aligned_and_c_contiguous(shape, dtype):
    for _ in range(5):  # several allocations: not aligned by luck
        a = hostarray.empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype
        assert hostarray.is_aligned(a)


def test_array_copies_only_when_it_must():
    x = np.arange(12.0).reshape(3, 4)
    y = hostarray.array(x, np.float32)
    assert hostarray.is_aligned(y) and y.dtype == np.float32
    np.testing.assert_array_equal(y, x)
    assert hostarray.array(y) is y  # already aligned, same dtype
    assert hostarray.array(y, np.float64) is not y
    z = hostarray.array(np.asfortranarray(y))  # not C-contiguous: copied
    assert z.flags.c_contiguous and hostarray.is_aligned(z)
    np.testing.assert_array_equal(z, x)
    assert not hostarray.is_aligned(x[:, 1:])


@on_cpu
def test_to_device_shares_aligned_arrays_and_copies_others():
    net = fnnet.MLP((4, 3, 2), output="softmax", loss="cross_entropy")
    params = net.init(jax.random.key(0), jnp.float32)
    y = np.zeros(256, np.int32)
    shared = hostarray.empty((256, 4), np.float32)
    shared[:] = np.random.default_rng(0).standard_normal((256, 4))
    X, _ = train.to_device(net, params, shared, y)
    assert X.unsafe_buffer_pointer() == shared.ctypes.data
    # A NumPy array at a 16-byte offset from alignment: the device copies it.
    raw = hostarray.empty((256 * 4 + 4,), np.float32)
    offset = raw[4:].reshape(256, 4)
    offset[:] = shared
    X2, _ = train.to_device(net, params, offset, y)
    assert X2.unsafe_buffer_pointer() != offset.ctypes.data
    np.testing.assert_array_equal(X, X2)


def test_load_dataset_returns_aligned_float32_arrays():
    ds = load_dataset("diabetes", seed=0)
    for a in (ds.x_train, ds.x_val, ds.x_test, ds.y_train, ds.y_val, ds.y_test):
        assert a.dtype == np.float32 and hostarray.is_aligned(a)
