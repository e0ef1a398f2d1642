"""Data sets: loading, checking, stratified splits and standardization.

Pure numpy; jax is not imported here. Sources:

* the data sets that ship inside scikit-learn (no download): ``BUILTIN`` maps
  each name to its task. scikit-learn is optional and imported only when one
  of them is asked for;
* ``.csv`` files: comma separated, an optional header row, one target column;
* ``.npz`` files: arrays ``x`` (or ``X``), shape (N, D), and ``y`` (or ``Y``),
  shape (N,) or (N, T). Loaded with ``allow_pickle=False``: never pickle.

Every problem with the data raises :class:`DataError`, whose message starts
with the file (or builtin name) and says what is wrong and where: CSV
positions are ``line`` numbers counted from 1, as in an editor, and ``column``
indices counted from 0, as ``target`` takes them.

:func:`load_dataset` is the one-call pipeline::

    load_arrays -> encode labels -> split -> standardize (train statistics)

Labels are encoded to 0..K-1 in sorted order of the original labels, kept in
``Dataset.classes``. Features, and regression targets, are standardized with
the mean and standard deviation of the training split only, so nothing of the
validation or test rows leaks into training.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from fnnet import hostarray
from fnnet.errors import InputError
from fnnet.npzfile import npz_problem

TASKS = ("classification", "regression")

#: The data sets inside scikit-learn (``sklearn.datasets.load_<name>``) and
#: their tasks.
BUILTIN = {
    "digits": "classification",
    "breast_cancer": "classification",
    "iris": "classification",
    "wine": "classification",
    "diabetes": "regression",
}

#: Fewest rows a file may have: a train, a validation and a test split need a
#: few rows each.
MIN_ROWS = 5
#: The default shares of the validation and test splits (here, in
#: fnnet.stream and in the CLI).
VAL_FRACTION, TEST_FRACTION = 0.15, 0.2

#: Task inference: integer-valued (or string) 1-D targets with at most this
#: many distinct values are class labels; anything else is regression.
MAX_INFERRED_CLASSES = 50

_FILE_TYPES = (".csv", ".npz")


class DataError(InputError):
    """A data set that cannot be used: missing, malformed, or unfit for the task.

    The message names the file (or builtin data set) first, then the problem
    and where it is. A ``ValueError`` (through :class:`fnnet.InputError`).
    """


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A data set split into train/validation/test, ready for training.

    Features are float32 and standardized with the training split's
    statistics. Classification labels are int32 in 0..K-1; regression targets
    are float32 (N, T), standardized with the training split's statistics.

    Args:
      name: the builtin name or the file path it was loaded from.
      task: ``"classification"`` or ``"regression"``.
      x_train: (N_train, D) float32 standardized features.
      y_train: (N_train,) int32 labels, or (N_train, T) float32 standardized
        targets.
      x_val: (N_val, D), possibly N_val = 0.
      y_val: (N_val,) or (N_val, T).
      x_test: (N_test, D).
      y_test: (N_test,) or (N_test, T).
      num_features: D.
      num_outputs: K classes, or T targets.
      classes: original labels in label order (label k is ``classes[k]``);
        ``()`` for regression.
      x_mean: (D,) float64 training-split feature means: the exact values
        the splits were scaled with (in float64, then rounded to float32), so
        :meth:`scale_x` of raw training rows gives ``x_train`` bit for bit.
      x_std: (D,) float64 training-split feature standard deviations (1 for
        constant columns).
      y_mean: (T,) float64 training-split target means; (0,) for
        classification.
      y_std: (T,) float64 training-split target standard deviations; (0,) for
        classification.
    """

    name: str
    task: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_features: int
    num_outputs: int
    classes: tuple
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray

    def scale_x(self, x) -> np.ndarray:
        """New raw features (N, D) to the model's units, with the training stats.

        Args:
          x: (N, D) features in the original units.

        Returns:
          (N, D) float32 ``(x - x_mean) / x_std``.

        Raises:
          ValueError: ``x`` is not (N, D) with D = ``num_features``.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"x must have shape (N, {self.num_features}) for data set "
                f"{self.name!r}; got {x.shape}"
            )
        return ((x - self.x_mean) / self.x_std).astype(np.float32)

    def unscale_y(self, y_std_units) -> np.ndarray:
        """Regression outputs in standardized units back to the original units.

        Args:
          y_std_units: (N, T) (or (T,)) predictions or targets in the units of
            ``y_train``.

        Returns:
          float32 array of the same shape, ``y * y_std + y_mean``.

        Raises:
          ValueError: the data set is a classification one, or the last axis
            is not T.
        """
        if self.task != "regression":
            raise ValueError(
                f"unscale_y applies to regression data sets; {self.name!r} is "
                f"{self.task}"
            )
        y = np.asarray(y_std_units, dtype=np.float32)
        if y.ndim == 0 or y.shape[-1] != self.num_outputs:
            raise ValueError(
                f"y_std_units must end in the {self.num_outputs} target(s) of "
                f"{self.name!r}; got shape {y.shape}"
            )
        return (y * self.y_std + self.y_mean).astype(np.float32)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, "
            f"num_features={self.num_features}, num_outputs={self.num_outputs}, "
            f"train={len(self.x_train)}, val={len(self.x_val)}, "
            f"test={len(self.x_test)})"
        )


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load_arrays(
    name_or_path, *, target=None, task: str | None = None, dtype=None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Raw features and targets of a builtin data set or a ``.csv``/``.npz`` file.

    Args:
      name_or_path: a key of ``BUILTIN``, or a path ending in ``.csv`` or
        ``.npz``.
      target: CSV only: the target column, by header name or integer index
        (negative counts from the end); default the last column.
      task: ``"classification"``, ``"regression"``, or None to infer it (see
        :func:`infer_task`).
      dtype: the floating dtype the features (and regression targets) will be
        trained in, e.g. ``np.float32``: a value it cannot hold (it would
        become inf) is refused, naming where it is. None: no such check.

    Returns:
      ``(x, y, task)``: x (N, D) float64; y (N,) raw labels (integers or
      strings) for classification, (N,) or (N, T) float64 for regression.

    Raises:
      DataError: unknown name, unreadable or malformed file, or targets that do
        not fit ``task``.
      ValueError: ``task`` is not one of ``TASKS``.
    """
    _check_task_name(task)
    name = os.fspath(name_or_path)
    if name in BUILTIN:
        return _load_builtin(name, target=target, task=task)
    ext = os.path.splitext(name)[1].lower()
    if ext == ".csv":
        return load_csv(name, target=target, task=task, dtype=dtype)
    if ext == ".npz":
        if target is not None:
            raise DataError(
                f"{name}: target={target!r} applies only to .csv files; an .npz "
                "file holds its targets in the array 'y'"
            )
        return load_npz(name, task=task, dtype=dtype)
    if os.path.isfile(name):
        raise DataError(
            f"{name}: unsupported file type {ext or '(no extension)'!r}; "
            f"expected one of {_FILE_TYPES}"
        )
    raise DataError(
        f"{name}: unknown data set: not a builtin ({', '.join(sorted(BUILTIN))}) "
        "and not a .csv or .npz file"
    )


def _load_builtin(name: str, *, target, task):
    if target is not None:
        raise DataError(
            f"{name}: target={target!r} applies only to .csv files; builtin "
            "data sets have a fixed target"
        )
    if task is not None and task != BUILTIN[name]:
        raise DataError(
            f"{name}: builtin data set {name!r} is a {BUILTIN[name]} task; got "
            f"task={task!r}"
        )
    try:
        from sklearn import datasets
    except ImportError as e:  # scikit-learn is an optional dependency
        raise ImportError(
            f"the builtin data set {name!r} comes from scikit-learn, which is "
            "not installed: pip install scikit-learn"
        ) from e
    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return np.asarray(x, np.float64), np.asarray(y), BUILTIN[name]


def load_csv(path, *, target=None, task: str | None = None, dtype=None):
    """Features and one target column from a comma-separated file.

    The first row is a header when any of its feature cells is not a number
    (or when its target cell is text and every other target cell is a
    number); with ``target`` given by name the first row is always the
    header. Blank lines are skipped.

    Args:
      path: the ``.csv`` file.
      target: the target column: a header name, or an integer index (negative
        counts from the end). Default: the last column.
      task: ``"classification"``, ``"regression"``, or None to infer it.
      dtype: the floating dtype the values will be trained in; a feature (or
        regression target) it cannot hold is refused with its line and column.

    Returns:
      ``(x, y, task)``: x (N, D) float64; y (N,) float64 numbers, or strings
      when some target cell is not a number (classification only).

    Raises:
      DataError: the file is missing, empty, ragged, has fewer than
        ``MIN_ROWS`` rows or fewer than 2 columns, an empty, non-numeric, NaN
        or infinite feature cell, an empty, NaN or infinite target cell, an
        unknown target column, or targets that do not fit ``task``.
    """
    _check_task_name(task)
    path = os.fspath(path)
    _check_file(path)
    rows, lines = _read_csv_rows(path)
    width = len(rows[0])
    if width < 2:
        raise DataError(
            f"{path}: needs at least 2 columns (features and a target); found {width}"
        )

    header = None
    if isinstance(target, str):
        header = [cell.strip() for cell in rows[0]]
        if target not in header:
            raise DataError(
                f"{path}: target column {target!r} not found in the header "
                f"{header} (line {lines[0]}); a file without a header needs "
                "target as an integer index"
            )
        if header.count(target) > 1:
            raise DataError(
                f"{path}: target column {target!r} appears {header.count(target)} "
                "times in the header"
            )
        t = header.index(target)
    else:
        t = _column_index(target, width, path)
        if _looks_like_header(rows, t):
            header = [cell.strip() for cell in rows[0]]
    if header is not None:
        rows, lines = rows[1:], lines[1:]
    if len(rows) < MIN_ROWS:
        raise DataError(
            f"{path}: too few rows: {len(rows)} data row(s), need at least {MIN_ROWS}"
        )

    def where(i, j):
        name = f" ({header[j]!r})" if header is not None else ""
        return f"line {lines[i]}, column {j}{name}"

    features = [j for j in range(width) if j != t]
    x = np.empty((len(rows), len(features)), dtype=np.float64)
    for i, row in enumerate(rows):
        for k, j in enumerate(features):
            x[i, k] = _parse_cell(row[j], path, lambda i=i, j=j: where(i, j))

    cells = [row[t].strip() for row in rows]
    numbers = [_float_or_none(c) for c in cells]
    for i, (cell, v) in enumerate(zip(cells, numbers, strict=True)):
        if cell == "":
            raise DataError(f"{path}: empty target cell at {where(i, t)}")
        if v is not None and not math.isfinite(v):
            kind = "NaN" if math.isnan(v) else "infinite"
            raise DataError(f"{path}: {kind} target {cell!r} at {where(i, t)}")
    if all(v is not None for v in numbers):
        y = np.asarray(numbers, dtype=np.float64)
    else:
        if task == "regression":
            i = next(i for i, v in enumerate(numbers) if v is None)
            raise DataError(
                f"{path}: non-numeric target {cells[i]!r} at {where(i, t)}; "
                "regression needs numbers"
            )
        y = np.asarray(cells, dtype=str)
    task = check_targets(y, task, path, where=lambda i: where(i, t))
    _check_range(x, dtype, path, lambda i, k: where(i, features[k]))
    if task == "regression":
        _check_range(y, dtype, path, lambda i: where(i, t))
    return x, y, task


def load_npz(path, *, task: str | None = None, dtype=None):
    """Features ``x`` (or ``X``) and targets ``y`` (or ``Y``) from an ``.npz`` file.

    Loaded with ``allow_pickle=False``: object arrays are refused, never
    unpickled.

    Args:
      path: the ``.npz`` file (as written by ``np.savez``).
      task: ``"classification"``, ``"regression"``, or None to infer it.
      dtype: the floating dtype the values will be trained in; a value of
        ``x`` (or of regression targets ``y``) it cannot hold is refused.

    Returns:
      ``(x, y, task)``: x (N, D) float64; y (N,) or (N, T), float64 numbers
      (or strings, for classification).

    Raises:
      DataError: the file is missing or not an .npz archive, an array is
        missing, is an object array, has the wrong rank or dtype, the row
        counts of x and y differ, there are fewer than ``MIN_ROWS`` rows, a
        value is NaN or infinite, or the targets do not fit ``task``.
    """
    _check_task_name(task)
    path = os.fspath(path)
    _check_file(path)
    try:
        problem = npz_problem(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror})") from e
    if problem is not None and not problem.startswith("a single .npy"):
        # Checked before np.load: absurd declared sizes are never allocated.
        raise DataError(f"{path}: not a readable .npz archive: {problem}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile, OSError and ValueError, depending on damage
        raise DataError(f"{path}: not a readable .npz archive ({e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path}: not an .npz archive (it holds a single array); save with "
            "np.savez(path, x=x, y=y)"
        )
    with archive:
        x = _npz_array(archive, ("x", "X"), path)
        y = _npz_array(archive, ("y", "Y"), path)

    if x.dtype.kind not in "biuf":
        raise DataError(
            f"{path}: array 'x' must be numeric (bool, int or float); got dtype "
            f"{x.dtype}"
        )
    if x.ndim != 2:
        raise DataError(f"{path}: array 'x' must be 2-D (N, D); got shape {x.shape}")
    if x.shape[1] == 0:
        raise DataError(f"{path}: array 'x' has no feature columns: shape {x.shape}")
    if y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[1] == 0):
        raise DataError(
            f"{path}: array 'y' must have shape (N,) or (N, T) with T >= 1; got "
            f"{y.shape}"
        )
    if y.dtype.kind not in "biufU":
        raise DataError(
            f"{path}: array 'y' must be numeric or strings; got dtype {y.dtype}"
        )
    if len(y) != len(x):
        raise DataError(
            f"{path}: mismatched rows: 'x' has {len(x)} rows but 'y' has {len(y)}"
        )
    if len(x) < MIN_ROWS:
        raise DataError(f"{path}: too few rows: {len(x)}, need at least {MIN_ROWS}")
    x = x.astype(np.float64)
    _check_finite(x, "x", path)
    if y.dtype.kind != "U":
        y = y.astype(np.float64)
        _check_finite(y, "y", path)
    task = check_targets(y, task, path, where=lambda i: f"y[{i}]")
    _check_range(x, dtype, path, lambda *i: f"x[{', '.join(map(str, i))}]")
    if task == "regression":
        _check_range(y, dtype, path, lambda *i: f"y[{', '.join(map(str, i))}]")
    return x, y, task


def _check_range(a: np.ndarray, dtype, path: str, where) -> None:
    """Refuse values that become inf in ``dtype`` (1e300 in float32)."""
    if dtype is None:
        return
    biggest = float(np.finfo(dtype).max)
    bad = np.abs(a) > biggest
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(
            f"{path}: value {a[index].item()!r} at {where(*index)} is too large for "
            f"{np.dtype(dtype).name}, the dtype it is trained in (largest "
            f"{biggest:.4g}); it would become infinite: rescale that column"
        )


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a regular file")


def _read_csv_rows(path: str) -> tuple[list[list[str]], list[int]]:
    """Non-blank rows of a CSV file, all of one width, and their line numbers."""
    rows, lines = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            line = 1
            for row in reader:
                if row and not (len(row) == 1 and row[0].strip() == ""):
                    rows.append(row)
                    lines.append(line)
                line = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror})") from e
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from e
    if not rows:
        raise DataError(f"{path}: empty file: no rows")
    width = len(rows[0])
    for row, line in zip(rows, lines, strict=True):
        if len(row) != width:
            raise DataError(
                f"{path}: ragged rows: line {line} has {len(row)} cells, "
                f"expected {width} (as on line {lines[0]})"
            )
    return rows, lines


def _column_index(target, width: int, path: str) -> int:
    if target is None:
        return width - 1
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise DataError(
            f"{path}: target must be a column name (str) or index (int); got {target!r}"
        )
    if not -width <= target < width:
        raise DataError(
            f"{path}: target index {target} out of range for {width} columns "
            f"(valid: {-width} to {width - 1})"
        )
    return int(target) % width


def _float_or_none(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _looks_like_header(rows: list[list[str]], t: int) -> bool:
    first = rows[0]
    if any(_float_or_none(c) is None for j, c in enumerate(first) if j != t):
        return True
    # Numeric feature names but a text target name over a numeric target.
    return (
        len(rows) > 1
        and _float_or_none(first[t]) is None
        and all(_float_or_none(row[t]) is not None for row in rows[1:])
    )


def _parse_cell(cell: str, path: str, where: Callable[[], str]) -> float:
    text = cell.strip()
    if text == "":
        raise DataError(f"{path}: empty cell at {where()}")
    v = _float_or_none(text)
    if v is None:
        raise DataError(f"{path}: non-numeric cell {text!r} at {where()}")
    if math.isnan(v):
        raise DataError(f"{path}: NaN cell {text!r} at {where()}")
    if math.isinf(v):
        raise DataError(f"{path}: infinite cell {text!r} at {where()}")
    return v


def _npz_array(archive, keys: Sequence[str], path: str) -> np.ndarray:
    present = [k for k in keys if k in archive.files]
    if not present:
        raise DataError(
            f"{path}: missing array {keys[0]!r} (or {keys[1]!r}); the archive "
            f"holds {sorted(archive.files)}"
        )
    if len(present) > 1:
        raise DataError(
            f"{path}: holds both {keys[0]!r} and {keys[1]!r}; keep only one"
        )
    key = present[0]
    try:
        return archive[key]
    except ValueError as e:
        if "pickle" in str(e):
            raise DataError(
                f"{path}: array {key!r} is an object array, which needs pickle "
                "to load and fnnet never unpickles; save it with a numeric dtype"
            ) from e
        raise DataError(f"{path}: cannot read array {key!r} ({e})") from e


def _check_finite(a: np.ndarray, key: str, path: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        value = a[index]
        kind = "NaN" if np.isnan(value) else "infinite value"
        where = ", ".join(map(str, index))
        raise DataError(
            f"{path}: {kind} in array {key!r} at {key}[{where}] "
            f"({int(bad.sum())} non-finite in all)"
        )


# --------------------------------------------------------------------------
# Tasks and labels
# --------------------------------------------------------------------------


def _check_task_name(task) -> None:
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None; got {task!r}")


def _is_integer_valued(y: np.ndarray) -> bool:
    if y.dtype.kind in "biu":
        return True
    return y.dtype.kind == "f" and bool(np.all(y == np.round(y)))


def infer_task(y) -> str:
    """The task a target array implies.

    1-D targets that are strings, or integer-valued with at most
    ``MAX_INFERRED_CLASSES`` distinct values, are class labels; everything
    else is regression. Strings are always classification (they cannot be
    regressed on).

    Args:
      y: (N,) or (N, T) targets.

    Returns:
      ``"classification"`` or ``"regression"``.
    """
    y = np.asarray(y)
    if y.ndim == 1 and y.dtype.kind in "US":
        return "classification"
    if (
        y.ndim == 1
        and _is_integer_valued(y)
        and len(np.unique(y)) <= MAX_INFERRED_CLASSES
    ):
        return "classification"
    return "regression"


def check_targets(
    y, task: str | None, source: str, *, where: Callable[[int], str] | None = None
) -> str:
    """Checks that targets fit a task (inferring the task when None).

    Classification needs 1-D labels, integers (or integer-valued floats) or
    strings, with at least 2 classes. Regression needs numbers.

    Args:
      y: (N,) or (N, T) targets.
      task: ``"classification"``, ``"regression"`` or None (infer).
      source: the file or data set name, for messages.
      where: row index -> its position in the source, for messages
        (default ``"row i"``).

    Returns:
      The task.

    Raises:
      DataError: the targets do not fit the task.
    """
    _check_task_name(task)
    y = np.asarray(y)
    where = where or (lambda i: f"row {i}")
    if task is None:
        task = infer_task(y)
    if task == "regression":
        if y.dtype.kind not in "biuf":
            raise DataError(
                f"{source}: regression needs numeric targets; got dtype {y.dtype}"
            )
        return task
    if y.ndim != 1:
        raise DataError(
            f"{source}: labels that do not fit classification: need one label "
            f"per row, shape (N,); got {y.shape}"
        )
    if y.dtype.kind == "f" and not _is_integer_valued(y):
        i = int(np.flatnonzero(y != np.round(y))[0])
        raise DataError(
            f"{source}: labels that do not fit classification: {y[i].item()!r} at "
            f"{where(i)} is not an integer; use task='regression' or integer "
            "(or string) class labels"
        )
    if y.dtype.kind not in "biufUS":
        raise DataError(
            f"{source}: class labels must be integers or strings; got dtype {y.dtype}"
        )
    classes = np.unique(y)
    if len(classes) < 2:
        raise DataError(
            f"{source}: classification needs at least 2 classes; found only 1 "
            f"class ({_label(classes[0])!r})"
        )
    return task


def _label(value):
    """A numpy label as a plain Python int or str."""
    if isinstance(value, (np.str_, str, np.bytes_, bytes)):
        return str(value)
    return int(value)


def encode_labels(y) -> tuple[np.ndarray, tuple]:
    """Class labels to 0..K-1 in sorted order of the original labels.

    Args:
      y: (N,) labels: integers, integer-valued floats or strings.

    Returns:
      ``(labels, classes)``: (N,) int32 in 0..K-1, and the K original labels
      (Python ints or strs), ``classes[k]`` being label k.
    """
    classes, labels = np.unique(np.asarray(y), return_inverse=True)
    return labels.astype(np.int32).reshape(-1), tuple(_label(c) for c in classes)


# --------------------------------------------------------------------------
# Splits and standardization
# --------------------------------------------------------------------------


def _split_sizes(n: int, val_fraction: float, test_fraction: float):
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name} must be in [0, 1); got {f!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            "val_fraction + test_fraction must be below 1 to leave training rows; "
            f"got {val_fraction} + {test_fraction}"
        )
    # A positive fraction gives at least one row.
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    return n - n_val - n_test, n_val, n_test


def _apportion(total, ideal, lo, hi, bias, rng) -> np.ndarray:
    """Integers a, lo <= a <= hi, sum(a) = total, each near ``ideal``.

    Starts from floor(ideal) and hands out (or takes back) single units, first
    to the entries furthest below (above) ideal + bias; random tie-breaks.
    """
    a = np.clip(np.floor(ideal).astype(np.int64), lo, hi)
    ties = rng.random(len(a))
    while (diff := total - int(a.sum())) != 0:
        if diff > 0:
            free = np.flatnonzero(a < hi)
            key = (ideal + bias - a)[free]
        else:
            free = np.flatnonzero(a > lo)
            key = (a - ideal - bias)[free]
        if free.size == 0:  # the callers check feasibility first
            raise AssertionError(f"cannot apportion {total} within [{lo}, {hi}]")
        order = free[np.lexsort((ties[free], -key))][: abs(diff)]
        a[order] += 1 if diff > 0 else -1
    return a


def split(
    x,
    y,
    *,
    task: str,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
):
    """Shuffled train/validation/test split; stratified for classification.

    Split sizes are ``round(fraction * N)`` (at least 1 for a positive
    fraction); training gets the rest. For classification every class keeps
    its proportion in each split within rounding, and every non-empty split
    holds every class. The same seed gives the same split.

    Args:
      x: (N, D) features.
      y: (N,) labels or (N,)/(N, T) targets.
      task: ``"classification"`` (stratified) or ``"regression"`` (plain
        shuffle).
      val_fraction: fraction of rows for validation, in [0, 1); 0 gives an
        empty validation split with shapes (0, D) and (0,)/(0, T).
      test_fraction: fraction of rows for testing, in [0, 1).
      seed: seed of ``np.random.default_rng``.

    Returns:
      ``((x_train, y_train), (x_val, y_val), (x_test, y_test))``, each split
      in shuffled order.

    Raises:
      DataError: a class has fewer members than there are non-empty splits,
        or a non-empty split would have fewer rows than there are classes.
      ValueError: bad fractions, unknown task, or x and y row counts differ.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(
            f"x and y must have the same number of rows; got {len(x)} and {len(y)}"
        )
    n = len(x)
    sizes = _split_sizes(n, val_fraction, test_fraction)
    rng = np.random.default_rng(seed)
    if task == "regression":
        if sizes[0] < 1:
            raise DataError(f"too few rows ({n}) to leave any for training")
        perm = rng.permutation(n)
        parts = np.split(perm, [sizes[0], sizes[0] + sizes[1]])
    else:
        parts = _stratified_indices(y, sizes, val_fraction, test_fraction, rng)
    return tuple((x[idx], y[idx]) for idx in parts)


def _stratified_indices(y, sizes, val_fraction, test_fraction, rng):
    if y.ndim != 1:
        raise ValueError(f"classification labels must be 1-D (N,); got {y.shape}")
    n = len(y)
    classes, labels = np.unique(y, return_inverse=True)
    labels = labels.reshape(-1)
    counts = np.bincount(labels, minlength=len(classes))
    n_train, n_val, n_test = sizes
    used = [
        s
        for s, size in zip(("train", "validation", "test"), sizes, strict=True)
        if size
    ]
    k = len(classes)
    small = np.flatnonzero(counts < len(used))
    if small.size:
        c = small[0]
        raise DataError(
            f"class {_label(classes[c])!r} has {counts[c]} example(s), too few for "
            f"a stratified {'/'.join(used)} split, which needs at least "
            f"{len(used)} per class (one in each split); add examples, drop the "
            "class, or set val_fraction=0"
        )
    for split_name, size, arg, f in (
        ("test", n_test, "test_fraction", test_fraction),
        ("validation", n_val, "val_fraction", val_fraction),
        ("train", n_train, None, None),
    ):
        if size and size < k:
            fix = f"raise {arg} (now {f})" if arg else "lower the other fractions"
            raise DataError(
                f"the {split_name} split would have {size} rows, fewer than the "
                f"{k} classes, so some class would be missing from it; {fix} or "
                "use more data"
            )

    has_val, has_test = int(n_val > 0), int(n_test > 0)
    ideal_test = counts * (n_test / n)
    ideal_val = counts * (n_val / n)
    # Test first, keeping one row per class for each later non-empty split.
    test = _apportion(n_test, ideal_test, has_test, counts - has_val - 1, 0.0, rng)
    # Validation: favour classes that test rounded down, so that train, the
    # remainder, stays near its ideal too.
    val = _apportion(
        n_val, ideal_val, has_val, counts - test - 1, ideal_test - test, rng
    )

    parts = ([], [], [])
    for c in range(k):
        members = rng.permutation(np.flatnonzero(labels == c))
        parts[2].append(members[: test[c]])
        parts[1].append(members[test[c] : test[c] + val[c]])
        parts[0].append(members[test[c] + val[c] :])
    return tuple(rng.permutation(np.concatenate(p)).astype(np.intp) for p in parts)


def standardize(x_train, *others):
    """Zero mean, unit variance per column, with statistics of ``x_train`` only.

    Constant training columns get std 1 (they are centred, not divided by 0).

    Args:
      x_train: (N, ...) training rows, N >= 1.
      *others: arrays (M, ...) with the same trailing shape, scaled with the
        training statistics.

    Returns:
      ``(mean, std, scaled)``: mean and std of shape ``x_train.shape[1:]``
      (float64), and a list ``[x_train_scaled, *others_scaled]`` (float64).

    Raises:
      ValueError: ``x_train`` has no rows, or an ``others`` array's trailing
        shape differs.
    """
    x_train = np.asarray(x_train, dtype=np.float64)
    if x_train.ndim == 0 or len(x_train) == 0:
        raise ValueError(
            f"x_train must have at least one row; got shape {x_train.shape}"
        )
    others = [np.asarray(o, dtype=np.float64) for o in others]
    for i, o in enumerate(others):
        if o.shape[1:] != x_train.shape[1:]:
            raise ValueError(
                f"others[{i}] must have trailing shape {x_train.shape[1:]} like "
                f"x_train; got shape {o.shape}"
            )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    # Exactly constant columns: rounding in the mean can leave a tiny nonzero
    # std, which would blow rounding noise up to O(1), so test the range.
    constant = np.ptp(x_train, axis=0) == 0
    std = np.where(constant | (std == 0), 1.0, std)
    return mean, std, [(a - mean) / std for a in (x_train, *others)]


# --------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------


def load_dataset(
    name_or_path,
    *,
    target=None,
    task: str | None = None,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
) -> Dataset:
    """Loads, checks, splits and standardizes a data set.

    Args:
      name_or_path: a key of ``BUILTIN``, or a ``.csv``/``.npz`` path.
      target: CSV only: target column name or index (default the last).
      task: ``"classification"``, ``"regression"`` or None (infer).
      val_fraction: validation fraction in [0, 1); 0 for no validation rows.
      test_fraction: test fraction in [0, 1).
      seed: seed of the split.

    Returns:
      A :class:`Dataset` with float32 features, int32 labels or float32
      (N, T) targets, standardized with training-split statistics.

    Raises:
      DataError: the data cannot be loaded, does not fit the task, or cannot
        be split as asked.
      ValueError: bad ``task`` or fractions.
    """
    x, y, task = load_arrays(name_or_path, target=target, task=task, dtype=np.float32)
    name = os.fspath(name_or_path)
    raw = y
    if task == "classification":
        y, classes = encode_labels(y)
        num_outputs = len(classes)
    else:
        y = y.astype(np.float64).reshape(len(y), -1)
        classes = ()
        num_outputs = y.shape[1]
    try:
        # Split row indices by the original labels, so that messages name the
        # user's labels; the encoded ones sort alike, so the split is the same.
        rows = split(
            np.arange(len(x)),
            raw,
            task=task,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
    except DataError as e:
        raise DataError(f"{name}: {e}") from e
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = ((x[i], y[i]) for i, _ in rows)
    x_mean, x_std, (x_tr, x_va, x_te) = standardize(x_tr, x_va, x_te)
    if task == "regression":
        y_mean, y_std, (y_tr, y_va, y_te) = standardize(y_tr, y_va, y_te)
        y_tr, y_va, y_te = (hostarray.array(a, np.float32) for a in (y_tr, y_va, y_te))
    else:
        y_mean = y_std = np.zeros((0,), np.float64)

    def f32(a):  # aligned, so that a CPU device shares it (fnnet.hostarray)
        return hostarray.array(a, np.float32)

    return Dataset(
        name=name,
        task=task,
        x_train=f32(x_tr),
        y_train=y_tr,
        x_val=f32(x_va),
        y_val=y_va,
        x_test=f32(x_te),
        y_test=y_te,
        num_features=x.shape[1],
        num_outputs=num_outputs,
        classes=classes,
        x_mean=x_mean,
        x_std=x_std,
        y_mean=y_mean,
        y_std=y_std,
    )


# --------------------------------------------------------------------------
# New rows for a trained model
# --------------------------------------------------------------------------


class CsvColumns(NamedTuple):
    """Where the features and the target of a training CSV are.

    Args:
      features: the feature columns' header names in file order, or None when
        the file has no header row.
      target: the target column's header name, or None without a header.
      target_index: the target column's index, counted from 0.
      width: the number of columns.
    """

    features: list[str] | None
    target: str | None
    target_index: int
    width: int


def csv_columns(path, *, target=None) -> CsvColumns:
    """The column layout :func:`load_csv` reads from a file, with the same rules.

    Args:
      path: the ``.csv`` file.
      target: as for :func:`load_csv`.

    Returns:
      A :class:`CsvColumns`.

    Raises:
      DataError: the file cannot be read, or ``target`` names no column.
    """
    path = os.fspath(path)
    _check_file(path)
    rows, lines = _read_csv_rows(path)
    width = len(rows[0])
    if isinstance(target, str):
        header = [cell.strip() for cell in rows[0]]
        if target not in header:
            raise DataError(
                f"{path}: target column {target!r} not found in the header "
                f"{header} (line {lines[0]})"
            )
        t = header.index(target)
    else:
        t = _column_index(target, width, path)
        header = [c.strip() for c in rows[0]] if _looks_like_header(rows, t) else None
    if header is None:
        return CsvColumns(None, None, t, width)
    features = [name for j, name in enumerate(header) if j != t]
    return CsvColumns(features, header[t], t, width)


def label_indices(y, classes: Sequence, source: str, *, where=None) -> np.ndarray:
    """A model's class labels, as the user wrote them, to its indices 0..K-1.

    The inverse of :func:`encode_labels` for a model trained with ``classes``:
    string classes match text exactly; integer classes match integer-valued
    numbers, or text that reads as one (``"3"``, ``"3.0"``).

    Args:
      y: (N,) labels: strings or numbers.
      classes: the model's K labels, label k being ``classes[k]``.
      source: the file or argument name, for messages.
      where: row index -> its position in the source (default ``"row i"``).

    Returns:
      (N,) int32 indices into ``classes``.

    Raises:
      DataError: a label is not one of ``classes`` (or not 1-D).
    """
    y = np.asarray(y)
    where = where or (lambda i: f"row {i}")
    if y.ndim != 1:
        raise DataError(f"{source}: labels must be 1-D (N,); got shape {y.shape}")
    lookup = {c: k for k, c in enumerate(classes)}
    strings = all(isinstance(c, str) for c in classes)
    values, inverse = np.unique(y, return_inverse=True)
    codes = np.empty(len(values), np.int32)
    for u, value in enumerate(values):
        key = str(value) if strings else _as_int_label(value)
        if key not in lookup:
            i = int(np.flatnonzero(inverse.reshape(-1) == u)[0])
            raise DataError(
                f"{source}: label {_label_repr(value)} at {where(i)} is not one of "
                f"the {len(classes)} classes the model was trained on: "
                f"{list(classes)[:20]}"
            )
        codes[u] = lookup[key]
    return codes[inverse.reshape(-1)]


def _as_int_label(value):
    """An integer label from a number or its text, or None when it is not one."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number != round(number):
        return None
    return int(number)


def _label_repr(value) -> str:
    return repr(str(value)) if isinstance(value, (str, np.str_)) else repr(value.item())


def load_csv_features(
    path,
    *,
    num_features: int,
    feature_names: Sequence[str] | None = None,
    target: str | None = None,
    target_index: int | None = None,
    classes: Sequence | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """New rows for a trained model: its feature columns, and the target if present.

    With a header row and the training file's ``feature_names``, columns are
    matched by name (in any order; the target column is optional; any other
    column is an error). Otherwise by position: ``num_features`` columns, or
    ``num_features + 1`` with the target at ``target_index``. A header row of
    a model trained without names is skipped.

    Args:
      path: the ``.csv`` file.
      num_features: D, the model's input width.
      feature_names: the training file's feature names in training order, or
        None.
      target: the training file's target column name, or None.
      target_index: the target column's position in a file with D + 1
        columns (None: files must have exactly D columns).
      classes: the model's class labels (classification); None for
        regression.

    Returns:
      ``(x, y)``: x (N, D) float64 in training column order; y None without
      a target column, else (N,) int32 class indices (``classes`` given) or
      (N,) float64 targets.

    Raises:
      DataError: unreadable or ragged file, no data rows, wrong number of
        columns, an unknown, missing or repeated column name, an empty,
        non-numeric, NaN or infinite cell, or an unknown class label; the
        message names the line and column.
    """
    path = os.fspath(path)
    _check_file(path)
    rows, lines = _read_csv_rows(path)
    width = len(rows[0])
    D = num_features
    first = [cell.strip() for cell in rows[0]]
    text_at = [j for j, c in enumerate(first) if _float_or_none(c) is None]
    # A text cell makes the first row a header, except a text label in the
    # target column of a file without one.
    has_header = bool(text_at) and not (
        width == D + 1 and target_index is not None and text_at == [target_index]
    )
    header = first if has_header else None
    if has_header:
        rows, lines = rows[1:], lines[1:]
    if not rows:
        raise DataError(f"{path}: no data rows")

    if header is not None and feature_names is not None:
        columns, t = _columns_by_name(header, list(feature_names), target, path)
    else:
        layout = f"{D} feature columns"
        if target_index is not None:
            layout += f", or {D + 1} with the target in column {target_index}"
        if width == D:
            columns, t = list(range(D)), None
        elif width == D + 1 and target_index is not None:
            columns = [j for j in range(width) if j != target_index]
            t = target_index
        else:
            raise DataError(
                f"{path}: wrong number of columns: {width} on line {lines[0]}; the "
                f"model takes {layout}"
            )

    def where(i, j):
        name = f" ({header[j]!r})" if header is not None else ""
        return f"line {lines[i]}, column {j}{name}"

    x = np.empty((len(rows), D), dtype=np.float64)
    for i, row in enumerate(rows):
        for k, j in enumerate(columns):
            x[i, k] = _parse_cell(row[j], path, lambda i=i, j=j: where(i, j))
    if t is None:
        return x, None
    if classes is None:
        y = np.empty(len(rows), dtype=np.float64)
        for i, row in enumerate(rows):
            y[i] = _parse_cell(row[t], path, lambda i=i: where(i, t))
        return x, y
    cells = [row[t].strip() for row in rows]
    for i, cell in enumerate(cells):
        if cell == "":
            raise DataError(f"{path}: empty target cell at {where(i, t)}")
    y = label_indices(
        np.asarray(cells, dtype=str), classes, path, where=lambda i: where(i, t)
    )
    return x, y


def _columns_by_name(header, feature_names, target, path):
    """Feature column indices in training order, and the target's (or None)."""
    known = [*feature_names, *([target] if target is not None else [])]
    unknown = [c for c in header if c not in known]
    if unknown:
        raise DataError(
            f"{path}: column(s) {unknown} not among those the model was trained "
            f"on: features {feature_names}"
            + (f" and target {target!r}" if target is not None else "")
        )
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise DataError(f"{path}: column(s) {repeated} appear more than once")
    missing = [c for c in feature_names if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing feature column(s) {missing}; the model was trained "
            f"on {feature_names}"
        )
    t = header.index(target) if target in header else None
    return [header.index(c) for c in feature_names], t
