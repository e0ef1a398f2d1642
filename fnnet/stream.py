"""Data larger than memory: memory-mapped files read in chunks.

Pure numpy; jax is not imported here. Three layouts are read:

* a ``.npy`` file holding one 2-D numeric array (N, D + 1): the D features,
  then the target in the LAST column (as a CSV file's default target). Class
  labels are integer-valued numbers in that column;
* an ``.npz`` archive as written by ``np.savez`` (stored, not compressed),
  with arrays ``x`` (or ``X``), (N, D), and ``y`` (or ``Y``), (N,) or (N, T),
  as :func:`fnnet.data.load_npz` reads them; string labels are allowed;
* a folder of ``.npy`` shards, each laid out like a ``.npy`` file above, read
  in sorted name order; every shard has the same number of columns.

Nothing is read whole. Each read maps a window of at most ``chunk_rows`` rows
(``np.memmap`` at an offset), copies it and drops the mapping, so the
process's resident memory stays bounded by a few chunks whatever the file's
size (a mapping kept open for the whole file would count every page it
touched). Arrays are parsed from their headers only: object arrays are
refused, never unpickled.

:func:`open_stream` makes ONE pass over the data. It checks every value
(NaN, infinity), assigns every row to train, validation or test, and computes
the training split's statistics: per-column mean and standard deviation,
merged chunk by chunk in float64 with Chan et al.'s parallel update, which is
exact up to rounding (no sum of squares minus a squared sum). Problems raise
:class:`fnnet.data.DataError` naming the shard and the row, before any
training starts.

The split of a row depends only on the seed, the shard and the row's index
(a counter-based hash), not on ``chunk_rows``: each row lands in validation
with probability ``val_fraction`` and in test with ``test_fraction``, so the
split sizes are those fractions up to binomial noise, and classification
splits are not stratified (unlike :func:`fnnet.data.split`).

:meth:`StreamData.source` gives a re-iterable source of standardized
``(x, y)`` chunks for :func:`fnnet.train.fit` and
:func:`fnnet.train.evaluate_chunks`. Iterating it reads the split in file
order; ``source.shuffled(seed, epoch)`` reads the blocks of ``chunk_rows``
rows in an order drawn from (seed, epoch) and packs the split's rows into
chunks of exactly ``chunk_rows`` rows (the last one shorter), which
:func:`fnnet.train.fit` then shuffles within each chunk.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import zipfile
from collections.abc import Iterator

import numpy as np

from fnnet.data import (
    MAX_INFERRED_CLASSES,
    MIN_ROWS,
    TASKS,
    TEST_FRACTION,
    VAL_FRACTION,
    DataError,
)

#: Default chunk size of ``fnnet train`` in rows.
DEFAULT_CHUNK_ROWS = 65536
#: Most distinct labels a streamed classification target may have.
MAX_STREAM_CLASSES = 10000
SPLITS = ("train", "val", "test")
#: Rows standardized at a time (bounds the float64 temporaries of a block).
_SCALE_ROWS = 4096

_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
    (3, 0): np.lib.format.read_array_header_2_0,  # 2.0 with a UTF-8 header
}


def is_stream_path(path) -> bool:
    """Whether ``fnnet train`` streams this data by default: a .npy file or a folder."""
    path = os.fspath(path)
    return path.lower().endswith(".npy") or os.path.isdir(path)


@dataclasses.dataclass(frozen=True)
class DiskArray:
    """An array inside a file: where its data starts, its dtype and shape."""

    path: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop, copied out of a mapping of just those rows."""
        width = int(np.prod(self.shape[1:], dtype=np.int64))
        count = max(stop - start, 0) * width
        if count == 0:
            return np.empty((max(stop - start, 0), *self.shape[1:]), self.dtype)
        row = width * self.dtype.itemsize
        begin = self.offset + start * row
        base = begin - begin % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            window = mmap.mmap(
                f.fileno(),
                begin + count * self.dtype.itemsize - base,
                offset=base,
                access=mmap.ACCESS_READ,
            )
        try:
            view = np.frombuffer(window, self.dtype, count, begin - base)
            rows = view.reshape(stop - start, *self.shape[1:]).copy()
            del view  # the mapping closes only once no array looks into it
        finally:
            window.close()  # unmapped now, so its pages leave the resident set
        return rows


@dataclasses.dataclass(frozen=True)
class Shard:
    """One file (or archive) of rows: features x and targets y.

    ``y`` None: the target is the last column of ``x`` (the .npy layout).
    """

    name: str
    x: DiskArray
    y: DiskArray | None

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def num_features(self) -> int:
        return self.x.shape[1] - (1 if self.y is None else 0)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        x = self.x.read(start, stop)
        if self.y is None:
            return x[:, :-1], x[:, -1]
        return x, self.y.read(start, stop)


def _read_header(f, name: str, where: str):
    try:
        version = np.lib.format.read_magic(f)
        reader = _HEADER_READERS.get(version)
        if reader is None:
            raise ValueError(f"unknown .npy format version {version}")
        shape, fortran, dtype = reader(f)
    except ValueError as e:
        raise DataError(f"{name}: {where} is not a readable .npy array ({e})") from e
    if dtype.hasobject:
        raise DataError(
            f"{name}: {where} is an object array, which needs pickle to load and "
            "fnnet never unpickles; save it with a numeric dtype"
        )
    if fortran and len(shape) > 1:
        raise DataError(
            f"{name}: {where} is stored in Fortran order; save it C-ordered "
            "(np.ascontiguousarray) to stream it"
        )
    return tuple(int(s) for s in shape), dtype, f.tell()


def _check_numeric(name: str, what: str, dtype: np.dtype, kinds: str = "biuf"):
    if dtype.kind not in kinds or dtype.fields is not None:
        allowed = "numeric (bool, int or float)"
        if "U" in kinds:
            allowed += " or strings"
        raise DataError(f"{name}: {what} must be {allowed}; got dtype {dtype}")


def _open_npy(path: str) -> Shard:
    with open(path, "rb") as f:
        shape, dtype, offset = _read_header(f, path, "the file")
    _check_numeric(path, "the array", dtype)
    if len(shape) != 2 or shape[1] < 2:
        raise DataError(
            f"{path}: a streamed .npy file must be 2-D (N, D + 1), the features "
            f"then the target in the last column; got shape {shape}"
        )
    return Shard(path, DiskArray(path, offset, dtype, shape), None)


def _npz_member(path: str, zf: zipfile.ZipFile, f, keys) -> tuple[str, DiskArray]:
    names = {i.filename: i for i in zf.infolist()}
    present = [k for k in keys if f"{k}.npy" in names]
    if len(present) != 1:
        what = "missing" if not present else "holds both"
        raise DataError(
            f"{path}: {what} array {keys[0]!r} (or {keys[1]!r}); the archive "
            f"holds {sorted(n.removesuffix('.npy') for n in names)}"
        )
    key = present[0]
    info = names[f"{key}.npy"]
    if info.compress_type != zipfile.ZIP_STORED:
        raise DataError(
            f"{path}: array {key!r} is compressed (np.savez_compressed), which "
            "cannot be memory-mapped; save with np.savez to stream it"
        )
    f.seek(info.header_offset)
    local = struct.unpack("<4s5H3I2H", f.read(30))
    f.seek(info.header_offset + 30 + local[-2] + local[-1])
    shape, dtype, offset = _read_header(f, path, f"array {key!r}")
    return key, DiskArray(path, offset, dtype, shape)


def _open_npz(path: str) -> Shard:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable .npz archive ({e})") from e
    with zf, open(path, "rb") as f:
        kx, x = _npz_member(path, zf, f, ("x", "X"))
        ky, y = _npz_member(path, zf, f, ("y", "Y"))
    _check_numeric(path, f"array {kx!r}", x.dtype)
    _check_numeric(path, f"array {ky!r}", y.dtype, "biufU")
    if len(x.shape) != 2 or x.shape[1] == 0:
        raise DataError(f"{path}: array {kx!r} must be 2-D (N, D); got {x.shape}")
    if len(y.shape) not in (1, 2) or (len(y.shape) == 2 and y.shape[1] == 0):
        raise DataError(
            f"{path}: array {ky!r} must have shape (N,) or (N, T); got {y.shape}"
        )
    if y.shape[0] != x.shape[0]:
        raise DataError(
            f"{path}: mismatched rows: {kx!r} has {x.shape[0]} rows but {ky!r} "
            f"has {y.shape[0]}"
        )
    return Shard(path, x, y)


def open_shards(path) -> list[Shard]:
    """The shards of a .npy file, an .npz archive or a folder of .npy shards.

    Reads headers only. Raises :class:`DataError` for a missing path, an
    unreadable header, a non-numeric dtype (naming it), a wrong rank, or
    ragged shards (a shard whose column count differs from the first's).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, n) for n in os.listdir(path) if n.endswith(".npy")
        )
        if not files:
            raise DataError(f"{path}: a folder of shards holds no .npy files")
        shards = [_open_npy(p) for p in files]
        first = shards[0]
        for s in shards[1:]:
            if s.x.shape[1] != first.x.shape[1]:
                raise DataError(
                    f"{s.name}: ragged shards: {s.x.shape[1]} columns, expected "
                    f"{first.x.shape[1]} as in {first.name}"
                )
        return shards
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        return [_open_npy(path)]
    if ext == ".npz":
        return [_open_npz(path)]
    raise DataError(
        f"{path}: cannot stream {ext or '(no extension)'!r}; expected a .npy "
        "file, an .npz archive or a folder of .npy shards"
    )


# --------------------------------------------------------------------- splits


def _uniform(key: np.uint64, rows: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) number per row index: splitmix64 of (key, row)."""
    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + key
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def split_codes(
    seed: int, shard: int, start: int, stop: int, val: float, test: float
) -> np.ndarray:
    """0 (train), 1 (validation) or 2 (test) for rows start:stop of a shard."""
    key = np.random.SeedSequence([seed, shard]).generate_state(1, np.uint64)[0]
    u = _uniform(key, np.arange(start, stop, dtype=np.uint64))
    return np.where(u < test, 2, np.where(u < test + val, 1, 0)).astype(np.int8)


# ------------------------------------------------------------------ statistics


@dataclasses.dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations, merged chunk by chunk.

    Chan, Golub and LeVeque's update for combining two partial results, in
    float64; also the range, to tell exactly constant columns.
    """

    n: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    def add(self, a: np.ndarray) -> None:
        if len(a) == 0:
            return
        a = np.asarray(a, np.float64)
        nb, mb = len(a), a.mean(axis=0)
        m2b = np.square(a - mb).sum(axis=0)
        lo, hi = a.min(axis=0), a.max(axis=0)
        if self.n == 0:
            self.n, self.mean, self.m2, self.lo, self.hi = nb, mb, m2b, lo, hi
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + np.square(delta) * (self.n * nb / n)
        self.lo, self.hi = np.minimum(self.lo, lo), np.maximum(self.hi, hi)
        self.n = n

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and population std (ddof 0); 1 for constant columns."""
        std = np.sqrt(self.m2 / self.n)
        return self.mean, np.where((self.hi == self.lo) | (std == 0), 1.0, std)


# ------------------------------------------------------------------ the stream


@dataclasses.dataclass(frozen=True, eq=False)
class StreamData:
    """A data set read from disk chunk by chunk; see :func:`open_stream`.

    Like :class:`fnnet.data.Dataset` (same statistics fields, same units)
    but holding no rows: :meth:`source` reads them.
    """

    name: str
    task: str
    shards: tuple[Shard, ...]
    chunk_rows: int
    seed: int
    val_fraction: float
    test_fraction: float
    sizes: tuple[int, int, int]
    num_features: int
    num_outputs: int
    classes: tuple
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray

    def source(self, split: str) -> ChunkSource:
        """The rows of one split ("train", "val" or "test") as a chunk source."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        return ChunkSource(self, SPLITS.index(split))

    def blocks(self) -> list[tuple[int, int, int]]:
        """(shard, start, stop) of every block of ``chunk_rows`` rows, in file order."""
        return [
            (i, s, min(s + self.chunk_rows, shard.rows))
            for i, shard in enumerate(self.shards)
            for s in range(0, shard.rows, self.chunk_rows)
        ]

    def read_block(self, block, code: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows of one split in one block, standardized (float32)."""
        i, start, stop = block
        x, y = self.shards[i].read(start, stop)
        fractions = (self.val_fraction, self.test_fraction)
        keep = split_codes(self.seed, i, start, stop, *fractions) == code
        if not keep.all():
            x, y = x[keep], y[keep]
        # As fnnet.data does: float64 arithmetic, then float32; a slice of
        # rows at a time, so the block never has a whole float64 copy.
        out = np.empty(x.shape, np.float32)
        for s in range(0, len(x), _SCALE_ROWS):
            z = x[s : s + _SCALE_ROWS].astype(np.float64)
            z -= self.x_mean
            z /= self.x_std
            out[s : s + _SCALE_ROWS] = z
        x = out
        if self.task == "classification":
            y = np.searchsorted(_class_array(self.classes), y).astype(np.int32)
        else:
            y = y.astype(np.float64).reshape(len(y), -1)
            y = ((y - self.y_mean) / self.y_std).astype(np.float32)
        return x, y

    def __repr__(self) -> str:
        tr, va, te = self.sizes
        return (
            f"StreamData(name={self.name!r}, task={self.task!r}, "
            f"num_features={self.num_features}, num_outputs={self.num_outputs}, "
            f"train={tr}, val={va}, test={te}, chunk_rows={self.chunk_rows}, "
            f"shards={len(self.shards)})"
        )


def _class_array(classes: tuple) -> np.ndarray:
    return np.asarray(classes)


class ChunkSource:
    """A re-iterable source of ``(x, y)`` chunks of one split of a :class:`StreamData`.

    ``iter(source)`` reads the split's rows in file order (for evaluation);
    ``source.shuffled(seed, epoch)`` is a training pass, reading the blocks in
    an order drawn from (seed, epoch). Both pack the rows into chunks of
    exactly ``chunk_rows`` rows (the last one may be shorter).
    """

    def __init__(self, data: StreamData, code: int):
        self.data, self.code = data, code

    def __len__(self) -> int:
        return self.data.sizes[self.code]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self._packed(self.data.blocks())

    def shuffled(self, seed: int, epoch: int) -> Iterator[tuple[np.ndarray, ...]]:
        blocks = self.data.blocks()
        order = np.random.default_rng([seed, epoch]).permutation(len(blocks))
        return self._packed([blocks[b] for b in order])

    def _packed(self, blocks):
        """The split's rows of these blocks, in chunks of exactly ``chunk_rows``.

        Equal chunk shapes let one compiled function serve every chunk.
        """
        rows = self.data.chunk_rows
        xs, ys, have = [], [], 0
        for block in blocks:
            x, y = self.data.read_block(block, self.code)
            xs.append(x)
            ys.append(y)
            have += len(x)
            if have >= rows:
                one = len(xs) == 1
                X, Y = (
                    (xs[0], ys[0]) if one else (np.concatenate(xs), np.concatenate(ys))
                )
                # Copy the rest, so the packed chunk can go once it is used.
                xs, ys = [X[rows:].copy()], [Y[rows:].copy()]
                have -= rows
                yield X[:rows], Y[:rows]
        if have:
            yield np.concatenate(xs), np.concatenate(ys)


def open_stream(
    path,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    task: str | None = None,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
) -> StreamData:
    """Open a data set for streaming: one checking pass, splits and statistics.

    Args:
      path: a .npy file, an .npz archive or a folder of .npy shards (see the
        module docstring for their layouts).
      chunk_rows: rows per read and per training chunk; host memory is a few
        chunks' worth.
      task: ``"classification"``, ``"regression"`` or None to infer it, as
        :func:`fnnet.data.infer_task` does (a 1-D integer-valued target with
        at most ``MAX_INFERRED_CLASSES`` distinct values is classification).
      val_fraction, test_fraction: each row's chance of landing in the
        validation or the test split, in [0, 1) with a sum below 1.
      seed: the split's seed.

    Returns:
      A :class:`StreamData` with the training split's statistics.

    Raises:
      DataError: the data cannot be streamed (see :func:`open_shards`), holds
        a NaN or infinite value (naming the shard, row and column), has fewer
        than ``MIN_ROWS`` rows, or targets that do not fit ``task``; or a
        split came out empty.
      ValueError: bad ``chunk_rows``, ``task`` or fractions.
    """
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int):
        raise TypeError(f"chunk_rows must be a positive int; got {chunk_rows!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int; got {chunk_rows!r}")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None; got {task!r}")
    for arg, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{arg} must be in [0, 1); got {f!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            "val_fraction + test_fraction must be below 1 to leave training rows; "
            f"got {val_fraction} + {test_fraction}"
        )
    name = os.fspath(path)
    shards = open_shards(name)
    total = sum(s.rows for s in shards)
    if total < MIN_ROWS:
        raise DataError(f"{name}: too few rows: {total}, need at least {MIN_ROWS}")

    x_moments, y_moments = RunningMoments(), RunningMoments()
    sizes = [0, 0, 0]
    values = np.empty((0,))  # distinct targets, while there are few
    integer_valued, multi_target = True, False
    strings = any(s.y is not None and s.y.dtype.kind == "U" for s in shards)
    for i, shard in enumerate(shards):
        for start in range(0, shard.rows, chunk_rows):
            stop = min(start + chunk_rows, shard.rows)
            x, y = shard.read(start, stop)
            _check_finite(shard.name, x, start, "feature")
            if y.dtype.kind != "U":
                _check_finite(shard.name, y, start, "target")
                y = y.astype(np.float64)
                integer_valued = integer_valued and bool(np.all(y == np.round(y)))
            multi_target = multi_target or y.ndim == 2
            if values is not None:
                values = np.union1d(values, y) if values.size else np.unique(y)
                if len(values) > MAX_STREAM_CLASSES:
                    values = None
            codes = split_codes(seed, i, start, stop, val_fraction, test_fraction)
            train = codes == 0
            sizes = [a + int(np.sum(codes == c)) for c, a in enumerate(sizes)]
            x_moments.add(x[train])
            if not strings:
                y_moments.add(y[train].reshape(int(train.sum()), -1))

    if task is None:
        few = values is not None and len(values) <= MAX_INFERRED_CLASSES
        classes_like = strings or (integer_valued and few and not multi_target)
        task = "classification" if classes_like else "regression"
    if task == "regression" and strings:
        raise DataError(f"{name}: regression needs numeric targets; got strings")
    for split, size, frac in zip(
        ("training", "validation", "test"),
        sizes,
        (1.0, val_fraction, test_fraction),
        strict=True,
    ):
        if frac > 0 and size == 0:
            raise DataError(f"{name}: the {split} split came out empty; use more rows")
    x_mean, x_std = x_moments.mean_std()
    if task == "classification":
        if multi_target:
            raise DataError(
                f"{name}: labels that do not fit classification: need one label "
                "per row, shape (N,)"
            )
        if not strings and not integer_valued:
            raise DataError(
                f"{name}: labels that do not fit classification: some are not "
                "integers; use task='regression' or integer (or string) labels"
            )
        if values is None:
            raise DataError(
                f"{name}: more than {MAX_STREAM_CLASSES} distinct labels; too many "
                "classes to stream"
            )
        if len(values) < 2:
            raise DataError(f"{name}: classification needs at least 2 classes")
        classes = tuple(v.item() if strings else int(v) for v in values)
        num_outputs = len(classes)
        y_mean = y_std = np.zeros((0,), np.float64)
    else:
        classes = ()
        y_mean, y_std = y_moments.mean_std()
        num_outputs = len(y_mean)
    return StreamData(
        name=name,
        task=task,
        shards=tuple(shards),
        chunk_rows=chunk_rows,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        sizes=tuple(sizes),
        num_features=shards[0].num_features,
        num_outputs=num_outputs,
        classes=classes,
        x_mean=x_mean,
        x_std=x_std,
        y_mean=y_mean,
        y_std=y_std,
    )


def _check_finite(name: str, a: np.ndarray, start: int, what: str) -> None:
    if a.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(a)
    if bad.any():
        index = np.argwhere(bad)[0]
        value = a[tuple(index)]
        kind = "NaN" if np.isnan(value) else "infinite value"
        where = f"row {start + int(index[0])}"
        if a.ndim == 2:
            where += f", column {int(index[1])}"
        raise DataError(
            f"{name}: {kind} in the {what}s at {where} ({int(bad.sum())} "
            f"non-finite in rows {start}-{start + len(a) - 1})"
        )
