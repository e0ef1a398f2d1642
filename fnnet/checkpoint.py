"""Checkpoints: any pytree of arrays plus a JSON ``meta`` dict, in one ``.npz`` file.

File format (version 1): an uncompressed ``.npz`` (zip of ``.npy`` members, no
pickled objects), with

* one member per leaf, named by its key path (``jax.tree_util.keystr``, e.g.
  ``[0]['W']`` or ``[1][0].mu``); a typed PRNG key is stored as its
  ``jax.random.key_data`` (uint32);
* ``__fnnet_header__``: UTF-8 JSON as a uint8 array, ``{"format":
  "fnnet-checkpoint", "version": 1, "leaves": {path: {"dtype": name,
  "key_impl": name or null}}}``. The dtype name lets dtypes that ``.npy``
  stores as raw bytes (bfloat16 and the other ml_dtypes) come back typed;
  ``key_impl`` is the PRNG implementation of a typed key;
* ``__fnnet_meta__``: UTF-8 JSON as a uint8 array (config, epoch, history...).

Writes are atomic: the archive is written to a temporary file in the target's
directory, flushed and fsynced, then ``os.replace``-d onto the target, so a
kill at any moment leaves either the previous checkpoint or the new one, never
a mixture. Reads use ``allow_pickle=False`` and check every leaf's key path,
shape and dtype against a template (after equinox's ``_serialisation.py``); any
problem raises :class:`CheckpointError` naming the file.

Example::

    state = {"params": params, "opt_state": opt_state, "key": key, "epoch": 3}
    checkpoint.save("runs/ckpt.npz", state, meta={"config": cfg, "epoch": 3})
    meta = checkpoint.load_meta("runs/ckpt.npz")    # rebuild net/optimizer
    state, meta = checkpoint.load("runs/ckpt.npz", template=fresh_state)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from fnnet.errors import InputError
from fnnet.npzfile import npz_problem

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "load",
    "load_meta",
    "save",
    "write_atomically",
]

#: Version written by :func:`save`; :func:`load` reads the versions listed in
#: ``_SUPPORTED_VERSIONS``.
FORMAT_VERSION = 1
_SUPPORTED_VERSIONS = (1,)
_FORMAT_NAME = "fnnet-checkpoint"
_HEADER = "__fnnet_header__"
_META = "__fnnet_meta__"
_RESERVED = (_HEADER, _META)
# What a damaged or foreign file can make np.load / zipfile raise.
_READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    ValueError,
    OSError,
    EOFError,
    KeyError,
    RuntimeError,
    NotImplementedError,
)


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:  # Linux: /proc reports it; nothing is changed, no race with threads
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting and restoring it
    os.umask(mask)
    return mask


class CheckpointError(InputError):
    """A checkpoint file is missing, corrupt, or does not match the template.

    A ``ValueError`` (through :class:`fnnet.InputError`).
    """


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _flatten(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """Leaves with their key-path strings, and the treedef; paths must be unique."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    named = [(jax.tree_util.keystr(p), leaf) for p, leaf in path_leaves]
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        dups = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"tree has leaves with the same key path string: {dups}")
    for name in names:
        if name in _RESERVED:
            raise ValueError(f"key path {name!r} is reserved by the checkpoint format")
    return named, treedef


def _json_default(obj: Any) -> Any:
    # 0-d numpy/JAX numbers (a loss from a jitted step) become Python numbers;
    # float32 -> Python float is exact. Anything else is the caller's to convert.
    if isinstance(obj, (np.generic, np.ndarray, jax.Array)) and np.ndim(obj) == 0:
        return obj.item()
    raise TypeError(
        f"meta must be JSON-serializable; got {type(obj).__name__} {obj!r} "
        "(convert arrays with .tolist())"
    )


def _encode_json(obj: Any) -> np.ndarray:
    text = json.dumps(obj, default=_json_default, sort_keys=True)
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def _leaf_to_numpy(name: str, leaf: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The array to store for one leaf, and its header entry."""
    if _is_typed_key(leaf):
        data = np.asarray(jax.random.key_data(leaf))
        impl = str(jax.random.key_impl(leaf))
        return data, {"dtype": data.dtype.name, "key_impl": impl}
    arr = np.asarray(leaf)
    if not _storable(arr.dtype):
        raise TypeError(
            f"leaf {name or '<root>'} has dtype {arr.dtype} "
            f"(from {type(leaf).__name__}); checkpoints hold numeric arrays, "
            "Python/numpy scalars and typed PRNG keys only"
        )
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr, {"dtype": arr.dtype.name, "key_impl": None}


def _storable(dtype: np.dtype) -> bool:
    if dtype.kind in "biufc":
        return True
    if dtype.kind != "V" or dtype.names is not None:
        return False  # objects (would need pickle), strings, structured arrays
    try:  # raw-bytes dtypes that JAX knows by name: bfloat16, float8_*, int4...
        return jnp.dtype(dtype.name) == dtype
    except TypeError:
        return False


def _fsync_dir(directory: pathlib.Path) -> None:
    # Makes the rename itself durable. Not possible on every OS/file system
    # (Windows cannot open a directory); the rename is still atomic there.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path: str | os.PathLike, tree: Any, meta: dict | None = None) -> pathlib.Path:
    """Writes ``tree`` and ``meta`` to ``path`` atomically.

    The file is written whole to a temporary file next to ``path`` and renamed
    onto it, so readers (and a restart after a kill) see the old checkpoint or
    the new one, never a partial file. ``path`` is used as given (no ``.npz``
    is appended). Non-finite values are saved as they are.

    Args:
      path: destination file; missing parent directories are created.
      tree: a pytree (tuples, lists, dicts, NamedTuples such as optax states;
        ``None`` subtrees allowed) whose leaves are JAX/numpy arrays of a
        numeric dtype, Python/numpy scalars, or typed PRNG keys
        (``jax.random.key``). Legacy uint32 keys are ordinary arrays.
      meta: JSON-serializable dict (config, epoch, history...). 0-d numpy/JAX
        numbers are stored as Python numbers; tuples come back as lists.

    Returns:
      The path written, as a ``pathlib.Path``.

    Raises:
      TypeError: a leaf is not numeric (strings, objects), or ``meta`` is not a
        dict or not JSON-serializable.
      ValueError: two leaves have the same key path string.
      OSError: the file could not be written; the previous checkpoint at
        ``path``, if any, is untouched and no temporary file is left.
    """
    path = pathlib.Path(path)
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")

    # Everything that can fail on bad input happens before any file is touched.
    named, _ = _flatten(tree)
    arrays: dict[str, np.ndarray] = {}
    leaves: dict[str, dict[str, Any]] = {}
    for name, leaf in named:
        arrays[name], leaves[name] = _leaf_to_numpy(name, leaf)
    header = {"format": _FORMAT_NAME, "version": FORMAT_VERSION, "leaves": leaves}
    arrays[_HEADER] = _encode_json(header)
    arrays[_META] = _encode_json(dict(meta))

    return write_atomically(path, lambda f: np.savez(f, allow_pickle=False, **arrays))


def write_atomically(
    path: str | os.PathLike, write: Callable[[BinaryIO], None]
) -> pathlib.Path:
    """Writes a file whole or not at all: a temporary file, fsync, then rename.

    ``write(f)`` fills a temporary file opened for binary writing in the
    target's directory; the file is flushed, fsynced and ``os.replace``-d onto
    ``path``, so a kill at any moment leaves the previous file (or none) or
    the new one, never a partial one. :func:`save` writes checkpoints with it.

    Args:
      path: destination file; missing parent directories are created. An
        existing file keeps its permission bits; a new one gets the umask's.
      write: called once with the open binary file.

    Returns:
      The path written, as a ``pathlib.Path``.

    Raises:
      Whatever ``write`` or the file system raises; the previous file at
      ``path``, if any, is untouched and no temporary file is left.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777  # an overwrite keeps the file's mode
    except OSError:
        mode = 0o666 & ~_umask()  # a new file: what an ordinary open() gives
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        # Includes KeyboardInterrupt: never leave the temporary file behind.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


class _Archive:
    """An open checkpoint whose reads raise CheckpointError naming the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        try:
            problem = npz_problem(self.path)
        except FileNotFoundError as e:
            raise CheckpointError(f"checkpoint {self.path}: no such file") from e
        except OSError as e:
            raise self.error(f"cannot read the file ({e.strerror})") from e
        if problem is not None and not problem.startswith("a single .npy"):
            # Checked before np.load: absurd declared sizes are never allocated.
            raise self.error(f"not a readable .npz archive: {problem}")
        try:
            obj = np.load(self.path, allow_pickle=False)
        except FileNotFoundError as e:
            raise CheckpointError(f"checkpoint {self.path}: no such file") from e
        except _READ_ERRORS as e:
            raise self.error(
                f"not a readable .npz archive (corrupt or truncated?): {e!r}"
            ) from e
        if not isinstance(obj, np.lib.npyio.NpzFile):
            raise self.error("is a single .npy array, not a .npz checkpoint")
        self.npz = obj
        try:
            self.names = set(obj.files)
            self.header = self._read_json(_HEADER, "header")
            self._check_header()
        except BaseException:
            obj.close()
            raise

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {self.path}: {message}")

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.npz.close()

    def read(self, name: str) -> np.ndarray:
        try:
            return self.npz[name]
        except _READ_ERRORS as e:
            # allow_pickle=False makes an object array fail here, unread.
            raise self.error(f"cannot read entry {name!r}: {e}") from e

    def _read_json(self, name: str, what: str) -> Any:
        if name not in self.names:
            raise self.error(
                f"no {name} entry; not an fnnet checkpoint "
                f"(entries: {sorted(self.names)[:10]})"
            )
        raw = self.read(name)
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise self.error(f"{what} entry has dtype {raw.dtype}, shape {raw.shape}")
        try:
            return json.loads(raw.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self.error(f"{what} is not valid UTF-8 JSON: {e}") from e

    def _check_header(self) -> None:
        h = self.header
        if not isinstance(h, dict) or h.get("format") != _FORMAT_NAME:
            raise self.error(f"header does not name format {_FORMAT_NAME!r}: {h!r}")
        version = h.get("version")
        if version not in _SUPPORTED_VERSIONS:
            raise self.error(
                f"unknown format version {version!r}; this fnnet reads versions "
                f"{list(_SUPPORTED_VERSIONS)} (saved by a newer fnnet?)"
            )
        leaves = h.get("leaves")
        if not isinstance(leaves, dict):
            raise self.error("header has no 'leaves' table")
        stored = self.names - set(_RESERVED)
        if set(leaves) != stored:
            raise self.error(
                "header and archive disagree on the leaves: "
                f"{sorted(set(leaves) ^ stored)[:10]}"
            )

    def meta(self) -> dict:
        meta = self._read_json(_META, "meta")
        if not isinstance(meta, dict):
            raise self.error(f"meta is a JSON {type(meta).__name__}, not an object")
        return meta


def load_meta(path: str | os.PathLike) -> dict:
    """Reads only the ``meta`` dict of a checkpoint (no template needed).

    Use it to rebuild the configuration (network sizes, optimizer) from which
    the template for :func:`load` is made.

    Args:
      path: a file written by :func:`save`.

    Returns:
      The ``meta`` dict as saved (through JSON).

    Raises:
      CheckpointError: the file is missing, corrupt, of an unknown format
        version, or its meta is not a valid JSON object.
    """
    with _Archive(path) as archive:
        return archive.meta()


def _describe(shape: tuple[int, ...], dtype: Any) -> str:
    return f"shape {tuple(shape)} dtype {dtype}"


def _restore_leaf(archive: _Archive, name: str, like: Any) -> Any:
    """The stored leaf ``name``, checked against the template leaf ``like``."""
    where = f"leaf {name or '<root>'}"
    info = archive.header["leaves"][name]
    if not isinstance(info, dict):
        raise archive.error(f"{where}: bad header entry {info!r}")
    arr = archive.read(name)
    dtype_name = info.get("dtype")
    if arr.dtype.kind == "V" and dtype_name != arr.dtype.name:
        # ml_dtypes (bfloat16, float8...) are stored as raw bytes of that size.
        try:
            arr = arr.view(jnp.dtype(dtype_name))
        except (TypeError, ValueError) as e:
            raise archive.error(f"{where}: unknown dtype {dtype_name!r}") from e
    if arr.dtype.name != dtype_name:
        raise archive.error(
            f"{where}: header says dtype {dtype_name}, data has {arr.dtype}"
        )
    impl = info.get("key_impl")

    if _is_typed_key(like):
        expected = _describe(like.shape, like.dtype)
        if impl is None:
            raise archive.error(
                f"{where}: expected a typed PRNG key ({expected}), found a plain "
                f"array ({_describe(arr.shape, arr.dtype)})"
            )
        try:
            key = jax.random.wrap_key_data(arr, impl=impl)
        except Exception as e:  # unknown impl, or data of the wrong shape for it
            raise archive.error(
                f"{where}: cannot rebuild a {impl} key from data "
                f"{_describe(arr.shape, arr.dtype)}: {e}"
            ) from e
        if key.shape != like.shape or key.dtype != like.dtype:
            raise archive.error(
                f"{where}: expected {expected}, found {_describe(key.shape, key.dtype)}"
            )
        return key
    if impl is not None:
        raise archive.error(
            f"{where}: expected an array ({_describe(np.shape(like), _dtype(like))}),"
            f" found a typed PRNG key ({impl}, data shape {arr.shape})"
        )

    want_shape, want_dtype = tuple(np.shape(like)), _dtype(like)
    if arr.shape != want_shape or arr.dtype != want_dtype:
        raise archive.error(
            f"{where}: expected {_describe(want_shape, want_dtype)}, "
            f"found {_describe(arr.shape, arr.dtype)}"
        )
    if isinstance(like, (bool, int, float, complex)):
        return type(like)(arr.item())
    if jax.dtypes.canonicalize_dtype(arr.dtype) != arr.dtype:
        # Converting would silently round (e.g. float64 -> float32): refuse.
        raise archive.error(
            f"{where}: dtype {arr.dtype} cannot be held by JAX with "
            "jax_enable_x64 off; enable it to load this checkpoint"
        )
    return jnp.asarray(arr)


def _dtype(like: Any) -> np.dtype:
    dtype = getattr(like, "dtype", None)  # arrays, numpy scalars, ShapeDtypeStruct
    dtype = np.dtype(dtype) if dtype is not None else np.asarray(like).dtype
    return dtype.newbyteorder("=")  # save() stores native byte order


def load(path: str | os.PathLike, template: Any) -> tuple[Any, dict]:
    """Reads a checkpoint into the structure of ``template``.

    Every leaf of ``template`` must have a stored leaf under the same key path,
    of the same shape and dtype, and the file must hold no other leaves.

    Args:
      path: a file written by :func:`save`.
      template: a pytree of the saved structure, e.g. freshly initialised
        params and optimizer state; leaves may be arrays, scalars, typed PRNG
        keys or ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of an init).

    Returns:
      ``(tree, meta)``: ``tree`` has the template's structure; its leaves are
      JAX arrays (typed keys rewrapped with their saved implementation), except
      that Python-scalar template leaves come back as Python scalars of the
      same type. ``meta`` is the saved dict.

    Raises:
      CheckpointError: the file is missing, corrupt or truncated, holds an
        object (pickled) array, has an unknown format version, lacks a
        template leaf or has extra leaves, or a leaf's shape, dtype or key
        implementation differs from the template (message names the key path,
        expected and found).
    """
    named, treedef = _flatten(template)
    with _Archive(path) as archive:
        wanted = [name for name, _ in named]
        stored = set(archive.header["leaves"])
        missing = [n for n in wanted if n not in stored]
        extra = sorted(stored - set(wanted))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"template leaves missing from the file: {missing[:10]}")
            if extra:
                parts.append(f"file leaves not in the template: {extra[:10]}")
            raise archive.error(
                "tree structure differs from the template; "
                + "; ".join(parts)
                + " (different layer count or optimizer?)"
            )
        leaves = [_restore_leaf(archive, name, like) for name, like in named]
        meta = archive.meta()
    return jax.tree_util.tree_unflatten(treedef, leaves), meta
