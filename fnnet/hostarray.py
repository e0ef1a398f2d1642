"""Host arrays that JAX's CPU backend uses in place, without a copy.

``jax.device_put`` of a NumPy array copies it, unless the CPU client can
alias the array's memory: C-contiguous, and at an address that is a multiple
of :data:`ALIGNMENT` bytes. NumPy's allocator only promises 16 bytes, so a
large NumPy array is almost never aligned, and ``fit`` on it holds the data
twice: the caller's array and its device copy. An array made here is
aligned, so on a CPU the device array IS the host array (measured: peak RSS
of a 4,000,000-row ``fit`` 2.42x the data on NumPy's arrays, 1.41x on
these; ``python experiments/data_scale.py``).

fnnet's own loaders (:func:`fnnet.data.load_dataset`) return such arrays.
To share yours, allocate with :func:`empty` and fill it in place, or convert
once with :func:`array` and drop the original.

Sharing means what it says: writing to the host array while a device array
aliases it changes the device array too. On a GPU or TPU the device array is
a copy in device memory either way.
"""

from __future__ import annotations

import numpy as np

#: Alignment in bytes at which the CPU client aliases host memory.
ALIGNMENT = 64


def is_aligned(a: np.ndarray) -> bool:
    """True when ``a`` is C-contiguous and starts at a multiple of ALIGNMENT.

    An empty array counts as aligned: there is nothing to copy.
    """
    return a.flags.c_contiguous and (a.size == 0 or a.ctypes.data % ALIGNMENT == 0)


def empty(shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array at an ALIGNMENT-byte boundary."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def array(a, dtype=None) -> np.ndarray:
    """``a`` as an aligned C-contiguous array of ``dtype`` (default: its own).

    Returns ``a`` itself when it already is one; otherwise one copy, converted
    on the way (``a``'s values cast like ``ndarray.astype``).
    """
    a = np.asarray(a)
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    if a.dtype == dtype and is_aligned(a):
        return a
    out = empty(a.shape, dtype)
    np.copyto(out, a, casting="unsafe")
    return out
