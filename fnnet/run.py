"""A training run's folder as a model: load it, predict on new raw data, export it.

``fnnet train`` saves, with every checkpoint, what turns raw rows into the
network's input and its output back into the user's values, so a finished
run and an interrupted one (any run with a ``checkpoint.npz``) are both
usable models. The checkpoint's meta holds, under ``info.model``, a JSON
record (:func:`model_info`):

* ``network``: sizes, activations, output, loss, keep_prob (a user's
  extension by its import spec ``package.module:attribute``);
* ``dtype``: the parameters' dtype;
* ``task``, and ``classes``: the labels as written in the data (strings stay
  strings, integers integers), label k being ``classes[k]``;
* ``x_mean``, ``x_std``: the training split's feature statistics, and for
  regression ``y_mean``, ``y_std``, as float64 numbers (JSON writes a float64
  exactly), the very values the training data were scaled with;
* ``features``, ``target``, ``target_index``: the training file's column
  names (None without a header) and the target's position.

The parameters are the arrays of the same checkpoint
(:func:`fnnet.train.load_fit_params`), so one atomic file holds the model;
a kill during a save leaves the previous checkpoint, which loads.

Example::

    run = fnnet.load_run("runs/digits-20261201-101500")
    run.predict(x_raw)          # labels as in the data, or values in its units
    run.predict_proba(x_raw)    # (N, K) class probabilities
    run.evaluate(x_raw, y_raw)  # {"loss": ..., "accuracy": ..., "n": N}
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import importlib
import io
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

from fnnet import checkpoint as ckpt
from fnnet import core, losses
from fnnet.data import CsvColumns, Dataset, label_indices
from fnnet.network import MLP
from fnnet.train import load_fit_params
from fnnet.types import Params

__all__ = [
    "CHECKPOINT_FILE",
    "CHUNK_ROWS",
    "Run",
    "build_network",
    "export_safetensors",
    "load_run",
    "model_info",
    "predictions_csv",
    "safetensors_tensors",
]

#: The checkpoint of a run folder, written after every epoch.
CHECKPOINT_FILE = "checkpoint.npz"
#: Version of the ``info.model`` record written by :func:`model_info`.
MODEL_VERSION = 1
#: Largest number of rows one compiled call handles. Inputs are cut into
#: chunks of ``min(CHUNK_ROWS, next power of two >= N)`` rows, the last one
#: padded, so each network compiles at most once per power of two.
CHUNK_ROWS = 8192


def model_info(
    ds: Dataset, network: dict, dtype: str, columns: CsvColumns | None = None
) -> dict:
    """The ``info.model`` record of a run (see the module docstring).

    Args:
      ds: the data set the run trains on (its statistics and classes).
      network: the network definition, as :meth:`fnnet.MLP.describe` gives it
        but with each user extension's import spec in place of its name.
      dtype: the parameters' dtype name.
      columns: the training CSV's layout; None for other sources, whose
        feature columns are taken by position, with the target last.
    """
    if columns is None:
        columns = CsvColumns(None, None, ds.num_features, ds.num_features + 1)
    return {
        "version": MODEL_VERSION,
        "network": network,
        "dtype": str(dtype),
        "task": ds.task,
        "classes": list(ds.classes),
        "x_mean": np.asarray(ds.x_mean, np.float64).tolist(),
        "x_std": np.asarray(ds.x_std, np.float64).tolist(),
        "y_mean": np.asarray(ds.y_mean, np.float64).tolist(),
        "y_std": np.asarray(ds.y_std, np.float64).tolist(),
        "features": columns.features,
        "target": columns.target,
        "target_index": columns.target_index,
    }


def _resolve(value):
    """A built-in name as it is; an import spec to the object it names."""
    if not (isinstance(value, str) and ":" in value):
        return value
    module_name, _, attr = value.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # as for fnnet train: the current folder imports
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ckpt.CheckpointError(
            f"the run's network uses {value!r}, which cannot be imported here "
            f"({err}); run from the folder that holds {module_name}"
        ) from err
    return obj


def build_network(network: dict) -> MLP:
    """The :class:`fnnet.MLP` of a ``network`` definition (import specs resolved)."""
    act = network["activation"]
    act = tuple(_resolve(a) for a in act) if isinstance(act, list) else _resolve(act)
    return MLP(
        sizes=tuple(network["sizes"]),
        activation=act,
        output=_resolve(network["output"]),
        loss=_resolve(network["loss"]),
        keep_prob=network["keep_prob"],
        precision=network.get("precision"),  # absent: the platform default
    )


def _precision(dtype) -> contextlib.AbstractContextManager:
    """64-bit mode while a float64 model is loaded or called."""
    return jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()


@functools.partial(jax.jit, static_argnums=0)
def _outputs(net: MLP, params: Params, x):
    return core.forward(net, params, x)


@functools.partial(jax.jit, static_argnums=0)
def _losses_and_outputs(net: MLP, params: Params, x, y):
    trace = core.forward_cache(net, params, x)
    return losses.per_example_loss(net.loss, trace.a[-1], trace.z[-1], y), trace.z[-1]


def _chunks(n: int):
    size = min(CHUNK_ROWS, 1 << max(n - 1, 0).bit_length())
    return size, range(0, n, size)


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    if len(a) == size:
        return a
    return np.concatenate([a, np.zeros((size - len(a), *a.shape[1:]), a.dtype)])


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A trained network with the preprocessing of its training data.

    Made by :func:`load_run`. Every method takes raw rows, in the units and
    column order of the training data, and runs one compiled function per
    chunk of rows (:data:`CHUNK_ROWS`), in evaluation mode (no dropout).

    Attributes:
      path: the run folder.
      net: the :class:`fnnet.MLP`.
      params: its parameters (the best validation epoch's with early
        stopping, else the last saved epoch's).
      task: ``"classification"`` or ``"regression"``.
      classes: the class labels as written in the data; ``()`` for
        regression.
      x_mean, x_std: (D,) float64 feature statistics of the training split.
      y_mean, y_std: (T,) float64 target statistics (regression), else (0,).
      features: the training file's feature column names, or None.
      target: the training file's target column name, or None.
      target_index: the target's column in a file without names.
      epoch: the epochs the checkpoint holds.
      meta: the checkpoint's meta dict (settings, history...).
    """

    path: Path
    net: MLP
    params: Params
    task: str
    classes: tuple
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray
    features: tuple | None
    target: str | None
    target_index: int
    epoch: int
    meta: dict

    @property
    def dtype(self) -> np.dtype:
        """The parameters' dtype; inputs are scaled in float64, then cast to it."""
        return np.dtype(self.params[0]["W"].dtype)

    @property
    def num_features(self) -> int:
        return self.net.sizes[0]

    def __repr__(self) -> str:
        return (
            f"Run(path={str(self.path)!r}, task={self.task!r}, net={self.net}, "
            f"epoch={self.epoch})"
        )

    # -------------------------------------------------------------- inputs

    def scale(self, x_raw) -> np.ndarray:
        """Raw rows (N, D) to the network's input: ``(x - x_mean) / x_std``.

        Computed in float64 and rounded to the parameters' dtype, as the
        training rows were.

        Raises:
          TypeError: ``x_raw`` is not numeric.
          ValueError: not (N, D) with D the model's features, or a NaN or
            infinite value (its row and column are named).
        """
        x = np.asarray(x_raw)
        if x.dtype.kind not in "biuf":
            raise TypeError(
                f"x_raw must be numeric (N, {self.num_features}), got dtype {x.dtype}"
            )
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"x_raw must have shape (N, {self.num_features}) (the model's "
                f"{self.num_features} features), got {x.shape}"
            )
        bad = ~np.isfinite(x)
        if bad.any():
            i, j = (int(v) for v in np.argwhere(bad)[0])
            raise ValueError(
                f"x_raw[{i}, {j}] is {x[i, j]}; features must be finite "
                f"({int(bad.sum())} non-finite value(s) in all)"
            )
        x = x.astype(np.float64)
        return ((x - self.x_mean) / self.x_std).astype(self.dtype)

    def _model_targets(self, y_raw, n: int) -> np.ndarray:
        """y in the network's format: class indices, 0/1 column, or scaled."""
        if self.task == "classification":
            y = label_indices(y_raw, self.classes, "y_raw")
            if self.net.loss == "bce":
                y = y.astype(self.dtype)[:, None]
        else:
            y = np.asarray(y_raw)
            if y.dtype.kind not in "biuf":
                raise TypeError(f"y_raw must be numeric, got dtype {y.dtype}")
            T = len(self.y_mean)
            if y.ndim == 1 and T == 1:
                y = y[:, None]
            if y.ndim != 2 or y.shape[1] != T:
                raise ValueError(
                    f"y_raw must have shape (N,) or (N, {T}), got {np.shape(y_raw)}"
                )
            if not np.isfinite(y).all():
                raise ValueError("y_raw holds NaN or infinite values")
            y = ((y.astype(np.float64) - self.y_mean) / self.y_std).astype(self.dtype)
        if len(y) != n:
            raise ValueError(
                f"x_raw has {n} rows but y_raw has {len(y)}; give one target per row"
            )
        return y

    # ------------------------------------------------------------- outputs

    def outputs(self, x_raw) -> np.ndarray:
        """The network's outputs z^(L), (N, M_L), in its own units.

        Class probabilities for a softmax classifier, P(second class) for a
        one-unit sigmoid classifier, scaled targets for regression.
        """
        x = self.scale(x_raw)
        size, starts = _chunks(len(x))
        with _precision(self.dtype):
            parts = [
                np.asarray(_outputs(self.net, self.params, _pad(x[s : s + size], size)))
                for s in starts
            ]
        out = np.concatenate(parts) if parts else np.zeros((0, self.net.sizes[-1]))
        return out[: len(x)]

    def _classify(self, out: np.ndarray) -> np.ndarray:
        if self.net.loss == "bce":
            return (out[:, 0] > 0.5).astype(np.int64)
        return np.argmax(out, axis=-1)

    def _unscale(self, out: np.ndarray) -> np.ndarray:
        y = out.astype(np.float64) * self.y_std + self.y_mean
        return y[:, 0] if y.shape[1] == 1 else y

    def predict(self, x_raw) -> np.ndarray:
        """Predictions for raw rows, in the user's own values.

        Args:
          x_raw: (N, D) features in the training data's units and order.

        Returns:
          Classification: (N,) labels as in the training data (strings, or
          integers). Regression: (N,) values (or (N, T) for T targets) in the
          targets' units, float64.
        """
        out = self.outputs(x_raw)
        if self.task == "regression":
            return self._unscale(out)
        return np.asarray(self.classes)[self._classify(out)]

    def predict_proba(self, x_raw) -> np.ndarray:
        """(N, K) class probabilities, column k for ``classes[k]``.

        Raises:
          ValueError: the run is a regression.
        """
        if self.task != "classification":
            raise ValueError(
                "predict_proba applies to classifiers; this run is a regression "
                "model, use predict"
            )
        out = self.outputs(x_raw)
        if self.net.loss == "bce":
            return np.concatenate([1.0 - out, out], axis=1)
        return out

    def evaluate(self, x_raw, y_raw) -> dict:
        """The loss and metric training reports, on new raw rows.

        Args:
          x_raw: (N, D) raw features.
          y_raw: (N,) labels as in the training data, or regression targets
            (N,)/(N, T) in their units.

        Returns:
          ``{"loss": J, "accuracy" or "r2": metric, "n": N}``: J is the mean
          loss in the network's units (as ``test_loss`` of a run), R² the mean
          over targets; regression adds ``"rmse"`` in the targets' units.
        """
        x = self.scale(x_raw)
        y = self._model_targets(y_raw, len(x))
        size, starts = _chunks(len(x))
        per_example, outs = [], []
        with _precision(self.dtype):
            for s in starts:
                xb, yb = core.prepare(
                    self.net,
                    self.params,
                    _pad(x[s : s + size], size),
                    _pad(y[s : s + size], size),
                )
                li, out = _losses_and_outputs(self.net, self.params, xb, yb)
                per_example.append(np.asarray(li))
                outs.append(np.asarray(out))
        n = len(x)
        if n == 0:
            raise ValueError("x_raw has no rows")
        li = np.concatenate(per_example)[:n].astype(np.float64)
        out = np.concatenate(outs)[:n]
        result = {"loss": float(np.mean(li))}
        metric = core.metric_name(self.net)
        if self.task == "classification":
            labels = y[:, 0] > 0.5 if self.net.loss == "bce" else y
            result[metric] = float(np.mean(self._classify(out) == labels))
        else:
            y64, out64 = y.astype(np.float64), out.astype(np.float64)
            ss_res = np.sum((y64 - out64) ** 2, axis=0)
            ss_tot = np.sum((y64 - y64.mean(axis=0)) ** 2, axis=0)
            result[metric] = float(np.mean(1.0 - ss_res / ss_tot))
            err = (out64 - y64) * self.y_std
            result["rmse"] = float(np.sqrt(np.mean(err**2)))
        result["n"] = n
        return result


def load_run(path: str | os.PathLike) -> Run:
    """Loads a run folder written by ``fnnet train`` as a :class:`Run`.

    A finished or an interrupted run: anything with a checkpoint. The network
    is rebuilt from the saved definition (a user's extension is imported by
    its spec, the current folder importable) and checked against the
    checkpoint's.

    Args:
      path: the run folder (``--out`` of ``fnnet train``).

    Returns:
      The :class:`Run`.

    Raises:
      CheckpointError: no such folder; no checkpoint in it (training stopped
        before its first epoch ended, or not a run folder); a corrupt
        checkpoint; one without a model record (written by an fnnet from
        before runs saved their preprocessing); or a user extension of the
        network that cannot be imported.
    """
    path = Path(path)
    if not path.is_dir():
        raise ckpt.CheckpointError(f"run folder {path}: no such folder")
    file = path / CHECKPOINT_FILE
    if not file.is_file():
        raise ckpt.CheckpointError(
            f"run folder {path} has no finished checkpoint ({CHECKPOINT_FILE}): "
            "its training stopped before the first epoch ended, or it is not a "
            "run folder of fnnet train"
        )
    meta = ckpt.load_meta(file)
    model = (meta.get("info") or {}).get("model")
    if not isinstance(model, dict):
        raise ckpt.CheckpointError(
            f"checkpoint {file}: holds no model record (info.model); it was "
            "written by an fnnet that did not save the preprocessing yet: train "
            "the run again to predict with it"
        )
    if model.get("version") != MODEL_VERSION:
        raise ckpt.CheckpointError(
            f"checkpoint {file}: model record version {model.get('version')!r}; "
            f"this fnnet reads version {MODEL_VERSION}"
        )
    net = build_network(model["network"])
    dtype = np.dtype(model["dtype"])
    with _precision(dtype):
        params, meta = load_fit_params(file, net, dtype)
    classes = tuple(model["classes"])
    features = model["features"]
    return Run(
        path=path,
        net=net,
        params=params,
        task=model["task"],
        classes=classes,
        x_mean=np.asarray(model["x_mean"], np.float64),
        x_std=np.asarray(model["x_std"], np.float64),
        y_mean=np.asarray(model["y_mean"], np.float64),
        y_std=np.asarray(model["y_std"], np.float64),
        features=None if features is None else tuple(features),
        target=model["target"],
        target_index=int(model["target_index"]),
        epoch=int(meta["epoch"]),
        meta=meta,
    )


def safetensors_tensors(run: Run) -> dict[str, np.ndarray]:
    """The tensors :func:`export_safetensors` writes, by name.

    ``layer{l}.W`` (M_l, M_{l-1}) and ``layer{l}.b`` (M_l,) for l = 1..L in
    the parameters' dtype (a hidden block's own parameters as
    ``layer{l}.{block}.{name}``); ``x_mean``, ``x_std`` (D,) float64; for
    regression ``y_mean``, ``y_std`` (T,) float64.
    """
    tensors = {}
    for l, layer in enumerate(run.params, start=1):
        for keys, leaf in jax.tree_util.tree_flatten_with_path(layer)[0]:
            name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)
            tensors[f"layer{l}.{name}"] = np.ascontiguousarray(np.asarray(leaf))
    tensors["x_mean"], tensors["x_std"] = run.x_mean, run.x_std
    if run.task == "regression":
        tensors["y_mean"], tensors["y_std"] = run.y_mean, run.y_std
    return tensors


def export_safetensors(run: Run, path: str | os.PathLike) -> Path:
    """Writes the run's weights and preprocessing to a ``.safetensors`` file.

    Tensors as :func:`safetensors_tensors` names them. The metadata (strings,
    JSON where structured) holds ``format`` ("fnnet"), ``task``, ``network``
    (sizes, activation(s), output, loss), ``classes`` (labels as written),
    ``features``, ``target`` and ``recipe``, the formula from raw rows to
    predictions. Written atomically. Needs the ``safetensors`` package.

    Returns:
      The path written.
    """
    try:
        from safetensors.numpy import save
    except ImportError as err:  # an optional dependency
        raise ImportError(
            "exporting to safetensors needs the safetensors package: "
            "pip install safetensors"
        ) from err
    model = run.meta["info"]["model"]
    recipe = (
        "z0 = (x - x_mean) / x_std; z_l = h_l(z_{l-1} @ W_l.T + b_l) for l = 1..L "
        "with h_l the hidden activation(s), h_L the output"
    )
    if run.task == "regression":
        recipe += "; prediction = z_L * y_std + y_mean"
    elif run.net.loss == "bce":
        recipe += "; prediction = classes[int(z_L[0] > 0.5)]"
    else:
        recipe += "; prediction = classes[argmax(z_L)]"
    metadata = {
        "format": "fnnet",
        "version": str(MODEL_VERSION),
        "task": run.task,
        "network": json.dumps(model["network"]),
        "classes": json.dumps(list(run.classes)),
        "features": json.dumps(model["features"]),
        "target": json.dumps(model["target"]),
        "recipe": recipe,
    }
    data = save(safetensors_tensors(run), metadata=metadata)
    return ckpt.write_atomically(path, lambda f: f.write(data))


def predictions_csv(run: Run, x_raw) -> str:
    """Predictions for raw rows as CSV text, one row per input row, in order.

    Columns: ``prediction`` (``prediction_t`` for each of T > 1 targets) and,
    for classifiers, ``p_<label>`` per class. Numbers are written in full
    (Python's shortest round-trip form).
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    out = run.outputs(x_raw)  # one forward pass for labels and probabilities
    if run.task == "classification":
        pred = np.asarray(run.classes)[run._classify(out)]
        proba = out.astype(np.float64)
        if run.net.loss == "bce":
            proba = np.concatenate([1.0 - proba, proba], axis=1)
        w.writerow(["prediction", *(f"p_{c}" for c in run.classes)])
        for label, p in zip(pred.tolist(), proba.tolist(), strict=True):
            w.writerow([label, *p])
        return buf.getvalue()
    pred = run._unscale(out)
    if pred.ndim == 1:
        w.writerow(["prediction"])
        w.writerows([v] for v in pred.tolist())
    else:
        w.writerow([f"prediction_{t}" for t in range(pred.shape[1])])
        w.writerows(pred.tolist())
    return buf.getvalue()
