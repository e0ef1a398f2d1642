"""Command line: ``fnnet train``, ``sweep``, ``gradcheck``, ``predict``, ``evaluate``,
``export``.

Also ``python -m fnnet``. ``fnnet sweep`` trains every combination of seeds
and settings as one vmapped population (:mod:`fnnet.sweep`).

With no flags ``fnnet train`` trains a 64-128-10 ReLU network on
scikit-learn's bundled digits in a few seconds and writes its results to
``runs/``; ``fnnet gradcheck`` prints hand vs automatic vs finite-difference
gradient errors per layer. ``--help`` documents every flag.

``--activation``, ``--output`` and ``--loss`` also take an import spec
``package.module:attribute`` naming a user's :class:`fnnet.Activation` (or
:class:`fnnet.Block`, for hidden layers) or :class:`fnnet.Loss`; the current
directory is importable. The run's config.json keeps the spec, so ``--resume``
imports the same object again. ``fnnet train --check-every K`` verifies the
hand gradient against ``jax.grad`` every K epochs (see :func:`fnnet.train.fit`)
and writes the errors to history.csv and their maximum to metrics.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import importlib
import json
import math
import os
import shlex
import socket
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fnnet import checkpoint as ckpt
from fnnet import data as fdata
from fnnet import distributed
from fnnet import stream as fstream
from fnnet.activations import HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS, Activation
from fnnet.blocks import Block
from fnnet.errors import InputError
from fnnet.losses import LOSSES, Loss
from fnnet.network import MLP
from fnnet.precision import CHECK_PRECISION, PRECISIONS
from fnnet.privacy import ACCOUNTANT, poisson_schedule
from fnnet.run import (
    CHECKPOINT_FILE,
    export_safetensors,
    load_run,
    model_info,
    predictions_csv,
)
from fnnet.train import (
    GRADS,
    OPTIMIZERS,
    TrainConfig,
    batch_sharding,
    evaluate,
    evaluate_chunks,
    fit,
    grad_check_columns,
    grad_check_summary,
    metric_name,
)

CONFIG_FILE = "config.json"
#: fnnet train's defaults are TrainConfig's: one home for every setting.
TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
DEFAULT_EPOCHS = TRAIN_DEFAULTS["epochs"]
#: --dtype's help: both commands turn 64-bit mode on themselves for float64.
DTYPE_HELP = (
    "precision of parameters and data; float64 turns on JAX's 64-bit mode for "
    "this command's run only (no jax_enable_x64 needed)"
)
DEFAULT_DP_DELTA = 1e-5
#: Held (flock) by the run using the folder; says who holds it.
LOCK_FILE = "fnnet.lock"
#: How often ``fnnet train`` writes its checkpoint (``--checkpoint-every``).
DEFAULT_CHECKPOINT_EVERY = "2s"
#: Least seconds between two refreshes of the progress bar's numbers.
PROGRESS_SECONDS = 0.25

# Exit codes: 0 success, 2 bad usage, bad input or a file system error
# (argparse's convention), 3 training stopped on a non-finite loss, 130
# interrupted by Ctrl-C (SIGINT; 128 + 2, the shell's convention).
EXIT_USAGE, EXIT_NON_FINITE, EXIT_INTERRUPTED = 2, 3, 130

#: Settings that ``--resume`` may change (applied and reported); any other
#: flag given with ``--resume`` must equal the saved setting.
RESUME_MAY_CHANGE = ("epochs", "check_every", "checkpoint_every", "quiet")
#: config.json keys a run folder must have (later flags default when absent).
CONFIG_REQUIRED = (
    "data",
    "target",
    "task",
    "val_fraction",
    "test_fraction",
    "hidden",
    "activation",
    "output",
    "loss",
    "dtype",
    "optimizer",
    "lr",
    "momentum",
    "epochs",
    "batch_size",
    "grad",
    "seed",
    "l2",
    "weight_decay",
    "decay_biases",
    "keep_prob",
    "noise_std",
    "patience",
)
#: fnnet's argument names, as its messages say them, that a flag sets under
#: another name.
LIBRARY_NAMES = {"learning_rate": "lr", "sizes": "hidden"}

#: What an import spec may name, per flag.
SPEC_KINDS = {
    "--activation": ((Activation, Block), "an fnnet.Activation or fnnet.Block"),
    "--output": ((Activation,), "an fnnet.Activation"),
    "--loss": ((Loss,), "an fnnet.Loss"),
}
SPEC_HELP = " or an import spec package.module:attribute naming "


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a positive int, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default once, as "(default: X)".

    A help text that already says its default (one that is None or needs
    words, such as "default: the last column") is left as written, and a flag
    whose default is None or False gets no "(default: None)".
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class ListFlag(argparse.Action):
    """A list flag that takes commas, spaces or both: ``--hidden 64,64`` or
    ``--hidden 64 64``.

    Every value is split on commas; empty items are errors. ``item`` is
    ``"int"`` (positive integers: the flag's value is a list of ints) or
    ``"name"`` (non-empty names, re-joined with commas: the flag's value is one
    string such as ``"relu,tanh"``, as config.json stores it).
    """

    WHAT = {"int": "positive integers", "name": "names"}

    def __init__(self, option_strings, dest, item: str = "int", **kwargs):
        if item not in self.WHAT:
            raise ValueError(f"item must be one of {tuple(self.WHAT)}, got {item!r}")
        self.item = item
        kwargs.setdefault("nargs", "+")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.parse(values))

    def parse(self, values: list[str]):
        """The flag's value from its tokens (ArgumentError naming a bad one)."""
        items = []
        for token in values:
            parts = token.split(",")
            if not all(self._ok(part) for part in parts):
                raise argparse.ArgumentError(
                    self,
                    f"expected comma-separated {self.WHAT[self.item]}, got {token!r}",
                )
            items += parts
        if self.item == "int":
            return [int(v) for v in items]
        return ",".join(items)

    def _ok(self, part: str) -> bool:
        if self.item == "name":
            return bool(part.strip()) and part == part.strip()
        return part.isdigit() and int(part) >= 1


class ListsFlag(ListFlag):
    """A :class:`ListFlag` given once per list: ``--hidden 64 64 --hidden 128``
    is ``[[64, 64], [128]]``. Its default should be None (argparse would
    append to a default list).
    """

    def __call__(self, parser, namespace, values, option_string=None):
        lists = getattr(namespace, self.dest) or []
        setattr(namespace, self.dest, [*lists, self.parse(values)])


def _non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {value}")
    return value


#: Flags that say how this process joins the others: not run settings (a
#: resumed run may be launched differently), so config.json leaves them out.
PROCESS_FLAGS = (
    "coordinator",
    "num_processes",
    "process_id",
    "distributed",
    "heartbeat_timeout",
)


def _join_processes(args) -> None:
    """jax.distributed.initialize when the flags or the environment ask for it.

    A plain run (no flags, no multi-task launcher) starts nothing.
    """
    flags = {
        "--coordinator": args.coordinator,
        "--num-processes": args.num_processes,
        "--process-id": args.process_id,
    }
    given = [k for k, v in flags.items() if v is not None]
    if given and len(given) < 3:
        missing = [k for k in flags if k not in given]
        raise InputError(
            f"{', '.join(given)} needs {' and '.join(missing)} too: give "
            "--coordinator HOST:PORT --num-processes N --process-id I together"
        )
    if given:
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(
                f"--coordinator must be HOST:PORT with a port in 1..65535, got "
                f"{args.coordinator!r}"
            )
        if args.process_id >= args.num_processes:
            raise InputError(
                f"--process-id must be below --num-processes {args.num_processes}, "
                f"got {args.process_id}"
            )
    elif not (args.distributed or distributed.cluster_launch()):
        return
    distributed.initialize(
        args.coordinator,
        args.num_processes,
        args.process_id,
        heartbeat_timeout=args.heartbeat_timeout,
    )


def checkpoint_every(text: str) -> tuple[int | None, float | None]:
    """``--checkpoint-every``: ``N`` epochs or ``Ts`` seconds, as (epochs, seconds).

    Raises InputError naming the flag for anything else.
    """
    value = str(text).strip()
    try:
        if value.endswith("s"):
            seconds = float(value[:-1])
            if seconds >= 0 and seconds != float("inf"):
                return None, seconds
        else:
            epochs = int(value)
            if epochs >= 1:
                return epochs, None
    except ValueError:
        pass
    raise InputError(
        f"--checkpoint-every must be a positive number of epochs (e.g. 10) or of "
        f"seconds ending in s (e.g. 30s), got {text!r}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fnnet", description="Train MLPs with hand-written backpropagation."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "train",
        help="train a network on a bundled data set or a .csv/.npz file",
        description=(
            "Train an MLP. Data sets: "
            + ", ".join(fdata.BUILTIN)
            + " (bundled with scikit-learn, offline), or a path to a .csv or .npz "
            "file. Writes metrics.json, history.csv, checkpoint.npz, config.json "
            "and loss_curve.png to --out. The training defaults are those of "
            "fnnet.train.TrainConfig. List flags take commas or spaces: "
            "--hidden 64,64 or --hidden 64 64."
        ),
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("data")
    add_data_flags(g)
    g.add_argument(
        "--chunk-rows",
        type=_positive_int,
        default=None,
        metavar="R",
        help="stream the data from disk in chunks of R rows (host memory: a few "
        "chunks); on by default for a .npy file or a folder of .npy shards "
        f"(R = {fstream.DEFAULT_CHUNK_ROWS}), and for an .npz file when given. "
        "A .npy file holds the features then the target in its last column",
    )

    g = p.add_argument_group("network")
    g.add_argument(
        "--hidden",
        action=ListFlag,
        nargs="*",
        default=[128],
        metavar="M",
        help="hidden layer widths, e.g. --hidden 256,128 or --hidden 256 128; "
        "none (--hidden alone): a linear model (default: 128)",
    )
    g.add_argument(
        "--activation",
        action=ListFlag,
        item="name",
        default="relu",
        metavar="NAME",
        help="hidden activation, or one per hidden layer (relu,tanh or relu tanh); "
        f"each one of {', '.join(HIDDEN_ACTIVATIONS)}{SPEC_HELP}"
        f"{SPEC_KINDS['--activation'][1]}",
    )
    g.add_argument(
        "--output",
        default=None,
        help=f"output activation: one of {', '.join(OUTPUT_ACTIVATIONS)}{SPEC_HELP}"
        f"{SPEC_KINDS['--output'][1]} (default: softmax for classification, "
        "sigmoid with --loss bce, identity for regression)",
    )
    g.add_argument(
        "--loss",
        default=None,
        help=f"per-example loss: one of {', '.join(LOSSES)}{SPEC_HELP}"
        f"{SPEC_KINDS['--loss'][1]} (default: cross_entropy for classification, "
        "mse for regression; bce for two classes with one sigmoid output; a "
        "user's loss needs a regression task)",
    )
    g.add_argument(
        "--dtype", choices=("float32", "float64"), default="float32", help=DTYPE_HELP
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="matrix-product precision: default (TF32 for float32 on NVIDIA "
        "GPUs, fastest), high, or highest (full float32); CPUs compute float32 "
        "in float32 whatever the choice (None: the platform default)",
    )

    d = TRAIN_DEFAULTS
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=d["optimizer"], help="optimizer"
    )
    g.add_argument("--lr", type=float, default=d["learning_rate"], help="learning rate")
    g.add_argument(
        "--momentum",
        type=float,
        default=d["momentum"],
        help="momentum of --optimizer momentum/nesterov",
    )
    g.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"maximum epochs (default: {DEFAULT_EPOCHS}; with --resume, the run's "
        "own limit)",
    )
    g.add_argument(
        "--batch-size", type=int, default=d["batch_size"], help="mini-batch size"
    )
    g.add_argument("--grad", choices=GRADS, default=d["grad"], help="gradient source")
    g.add_argument(
        "--seed", type=int, default=d["seed"], help="seed for init, split, shuffle"
    )
    g.add_argument(
        "--devices",
        type=int,
        default=None,
        help="data-parallel over this many devices (batch axis sharded; default: "
        "one device)",
    )

    g = p.add_argument_group(
        "several processes",
        "one run over the devices of several processes (hosts, or one per GPU), "
        "each started with the same flags but its own --process-id; only process "
        "0 writes files. Without these flags, a launch by SLURM (srun) or Open "
        "MPI (mpirun) with more than one task is detected",
    )
    g.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="address of process 0, where it serves JAX's coordination service",
    )
    g.add_argument(
        "--num-processes",
        type=_positive_int,
        default=None,
        metavar="N",
        help="how many processes take part",
    )
    g.add_argument(
        "--process-id",
        type=_non_negative_int,
        default=None,
        metavar="I",
        help="this process's number, 0..N-1",
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="join the processes of the cluster that JAX detects (SLURM, Open "
        "MPI, Cloud TPU, Kubernetes) without the three flags above",
    )
    g.add_argument(
        "--heartbeat-timeout",
        type=_positive_int,
        default=None,
        metavar="SECONDS",
        help="a process silent this long counts as dead and the others stop "
        "with an error (default: JAX's, 100)",
    )

    g = p.add_argument_group("regularization")
    g.add_argument(
        "--l2", type=float, default=d["l2"], help="L2 penalty alpha/2 ||W||^2"
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=d["weight_decay"],
        help="decoupled weight decay: fraction of W removed per step",
    )
    g.add_argument(
        "--decay-biases", action="store_true", help="apply L2/decay to biases too"
    )
    drop = g.add_mutually_exclusive_group()
    drop.add_argument(
        "--keep-prob",
        type=float,
        default=None,
        help="dropout keep probability p (default: 1, no dropout)",
    )
    drop.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="dropout drop rate 1 - p, instead of --keep-prob",
    )
    g.add_argument(
        "--noise-std", type=float, default=d["noise_std"], help="input noise std"
    )
    g.add_argument(
        "--patience",
        type=int,
        default=d["patience"] or 0,
        help="early stopping patience in epochs (0: off)",
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "--out", default=None, help="output folder (default: runs/<data>-<time>)"
    )
    g.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR from its checkpoint (its saved settings; "
        "--epochs may raise the limit)",
    )
    g.add_argument(
        "--checkpoint-every",
        default=None,
        metavar="N|Ts",
        help="write checkpoint.npz every N epochs or every T seconds (e.g. 30s), "
        "from a background thread; also after the first compiled call and always "
        f"at the end (default {DEFAULT_CHECKPOINT_EVERY}; a resume repeats the "
        "epochs since the last checkpoint)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    g = p.add_argument_group("verification")
    g.add_argument(
        "--check-every",
        type=_positive_int,
        default=None,
        metavar="K",
        help="every K epochs compare the hand gradient with jax.grad on the first "
        "256 training rows (evaluation mode: no dropout, noise or L2); per-layer "
        "relative errors go to history.csv, their maximum to metrics.json; "
        "with --resume it may be set anew (default: off)",
    )

    g = p.add_argument_group(
        "privacy and gradient statistics",
        "DP-SGD: each step draws a Poisson batch (every example joins with "
        "probability batch-size / N), clips each example's gradient to norm "
        "--dp-clip, adds Gaussian noise of standard deviation dp-noise x dp-clip "
        "to the sum and divides by batch-size; the (epsilon, delta) spent comes "
        "from dp-accounting's RDP accountant and is shown in the progress bar, "
        "history.csv and metrics.json",
    )
    g.add_argument(
        "--dp-clip",
        type=float,
        default=None,
        metavar="C",
        help="per-example gradient norm bound: turns DP-SGD on (inf: no "
        "clipping; None: plain training)",
    )
    g.add_argument(
        "--dp-noise",
        type=float,
        default=TRAIN_DEFAULTS["dp_noise"],
        metavar="SIGMA",
        help="noise multiplier: noise standard deviation / C (needs --dp-clip)",
    )
    g.add_argument(
        "--dp-delta",
        type=float,
        default=None,
        metavar="DELTA",
        help="delta of the reported (epsilon, delta) (default with --dp-clip: "
        f"{DEFAULT_DP_DELTA})",
    )
    g.add_argument(
        "--log-noise-scale",
        action="store_true",
        help="every epoch, estimate the gradient noise scale B_simple = "
        "tr(Sigma)/|G|^2 from per-example gradient norms (history.csv: "
        "noise_scale, noise_trace, noise_grad_sq)",
    )

    c = sub.add_parser(
        "gradcheck",
        help="compare hand-written, jax.grad and finite-difference gradients",
        description=(
            "Build a network, draw a random batch, and print the relative error "
            "||u - v|| / max(||u||, ||v||) of each leaf between the hand-written "
            "backward pass, jax.grad and central finite differences. List flags "
            "take commas or spaces: --sizes 20,32,5 or --sizes 20 32 5."
        ),
        formatter_class=HelpFormatter,
    )
    c.add_argument(
        "--sizes",
        action=ListFlag,
        default=[64, 32, 10],
        metavar="M",
        help="layer widths M0 ... ML, inputs first (default: 64,32,10)",
    )
    c.add_argument(
        "--activation",
        action=ListFlag,
        item="name",
        default="tanh",
        metavar="NAME",
        help="hidden activation, or one per hidden layer (relu,tanh or relu tanh); "
        f"each one of {', '.join(HIDDEN_ACTIVATIONS)}, or a package.module:attribute "
        "spec",
    )
    c.add_argument(
        "--output",
        default="softmax",
        help=f"output activation: one of {', '.join(OUTPUT_ACTIVATIONS)}, or a "
        "package.module:attribute spec",
    )
    c.add_argument(
        "--loss",
        default="cross_entropy",
        help=f"per-example loss: one of {', '.join(LOSSES)}, or a "
        "package.module:attribute spec",
    )
    c.add_argument("--batch", type=int, default=16, help="examples in the batch")
    c.add_argument(
        "--dtype", choices=("float32", "float64"), default="float64", help=DTYPE_HELP
    )
    c.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=CHECK_PRECISION,
        help="matrix-product precision of the three gradients (default "
        "highest: a float32 check at TF32 would measure TF32, not the "
        "derivation)",
    )
    c.add_argument("--seed", type=int, default=0, help="seed for params and data")
    _add_model_commands(sub)
    add_sweep_parser(sub)
    return parser


def _add_model_commands(sub) -> None:
    """fnnet predict / evaluate / export: use a run folder as a model."""
    run_help = "run folder written by fnnet train (finished or interrupted)"
    data_help = (
        "CSV of raw rows: the training file's columns, matched by header name "
        "(any order) or by position"
    )
    p = sub.add_parser(
        "predict",
        help="predict on new rows with a trained run",
        description=(
            "Predict on the rows of a CSV with the network of a run folder. The "
            "CSV holds the training data's feature columns, with or without the "
            "target column; with it, the metrics are printed too. Writes one "
            "row per input row, in input order: the prediction (labels as in the "
            "training data, regression values in its units) and, for "
            "classifiers, the probability p_<label> of each class."
        ),
    )
    p.add_argument("--run", required=True, metavar="DIR", help=run_help)
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument(
        "--out", default=None, help="predictions CSV (default: standard output)"
    )
    e = sub.add_parser(
        "evaluate",
        help="metrics of a trained run on a labelled CSV",
        description=(
            "Loss and accuracy (or R^2 and RMSE in the target's units) of a run "
            "on the rows of a CSV that includes the target column; prints them "
            "and writes them as JSON."
        ),
    )
    e.add_argument("--run", required=True, metavar="DIR", help=run_help)
    e.add_argument("--data", required=True, help=data_help + ", with the target")
    e.add_argument(
        "--out", default=None, help="metrics JSON (default DIR/evaluation-<data>.json)"
    )
    x = sub.add_parser(
        "export",
        help="write a run's weights and preprocessing for other frameworks",
        description=(
            "Write the network's weights (layer<l>.W, layer<l>.b) and the "
            "preprocessing (x_mean, x_std; y_mean, y_std for regression) as "
            "tensors, with the network, classes and column names as metadata."
        ),
    )
    x.add_argument("--run", required=True, metavar="DIR", help=run_help)
    x.add_argument(
        "--format",
        choices=("safetensors",),
        default="safetensors",
        help="file format (default safetensors)",
    )
    x.add_argument(
        "--out", default=None, help="output file (default DIR/model.safetensors)"
    )


def _read_rows(run, path: str):
    """Features and (if present) targets of a CSV for ``run``, checked."""
    if Path(path).suffix.lower() != ".csv":
        raise fdata.DataError(f"--data {path}: expected a .csv file")
    x, y = fdata.load_csv_features(
        path,
        num_features=run.num_features,
        feature_names=run.features,
        target=run.target,
        target_index=run.target_index,
        classes=run.classes if run.task == "classification" else None,
    )
    if y is not None and run.task == "classification":
        y = np.asarray(run.classes)[y]  # evaluate takes labels as written
    return x, y


def _metrics_line(metrics: dict) -> str:
    return " ".join(
        f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in metrics.items()
    )


def _predict(args) -> int:
    run = load_run(args.run)
    x, y = _read_rows(run, args.data)
    text = predictions_csv(run, x)
    report = sys.stdout
    if args.out is None:
        sys.stdout.write(text)
        report = sys.stderr  # keep standard output a clean CSV
    else:
        ckpt.write_atomically(args.out, lambda f: f.write(text.encode("utf-8")))
        print(f"{len(x)} predictions -> {args.out}")
    if y is not None:
        print(_metrics_line(run.evaluate(x, y)), file=report)
    return 0


def _evaluate(args) -> int:
    run = load_run(args.run)
    x, y = _read_rows(run, args.data)
    if y is None:
        name = repr(run.target) if run.target else f"in column {run.target_index}"
        raise fdata.DataError(
            f"--data {args.data}: no target column ({name}); evaluate needs the "
            "targets (fnnet predict predicts without them)"
        )
    metrics = run.evaluate(x, y)
    out = Path(args.out or Path(args.run) / f"evaluation-{Path(args.data).stem}.json")
    record = {**metrics, "data": str(args.data), "run": str(args.run)}
    text = json.dumps(record, indent=2) + "\n"
    ckpt.write_atomically(out, lambda f: f.write(text.encode("utf-8")))
    print(f"{_metrics_line(metrics)} -> {out}")
    return 0


def _export(args) -> int:
    run = load_run(args.run)
    out = export_safetensors(run, args.out or Path(args.run) / "model.safetensors")
    print(f"{out}")
    return 0


def _model_record(s: dict, ds, net: MLP) -> dict:
    """The run's model record (fnnet.run.model_info): what prediction needs."""
    network = net.describe()
    acts = s["activation"].split(",")  # import specs as typed, for extensions
    network["activation"] = acts if len(acts) > 1 else acts[0]
    network["output"] = s["output"] or network["output"]
    network["loss"] = s["loss"] or network["loss"]
    columns = None
    if str(s["data"]).lower().endswith(".csv"):
        columns = fdata.csv_columns(s["data"], target=_target(s["target"]))
    return model_info(ds, network, s["dtype"], columns)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    run = {
        "train": _train,
        "sweep": _sweep,
        "gradcheck": _gradcheck,
        "predict": _predict,
        "evaluate": _evaluate,
        "export": _export,
    }[args.command]
    try:
        if args.command == "train":
            _join_processes(args)  # before anything else starts JAX
            return _train(args, given_flags(argv))
        return run(args)
    except InputError as err:
        # Bad flag values, files and settings end like argparse's own errors.
        # Anything else is a bug and keeps its traceback.
        print(f"fnnet {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fnnet {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:
        # The file system refused (a missing folder, no permission, a full
        # disk): the path and the cause. fnnet train says what it kept.
        where = f"{err.filename}: " if err.filename else ""
        print(
            f"fnnet {args.command}: error: {where}{err.strerror or err}",
            file=sys.stderr,
        )
        return EXIT_USAGE


def given_flags(argv: list[str]) -> set[str]:
    """The settings (argparse dests) that ``argv`` gives explicitly."""
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for a in sub._actions:
                    a.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def flag_of(key: str) -> str:
    """The train flag of a setting (argparse dest): val_fraction -> --val-fraction."""
    return "--" + key.replace("_", "-")


@contextlib.contextmanager
def user_input(name_of_key):
    """ValueErrors and TypeErrors of fnnet's checked constructors, as InputErrors.

    Only around calls that do nothing but check the user's values (MLP,
    TrainConfig, the data loader): their errors describe the input. The
    message is prefixed with the flag (or config.json key) that set the
    argument it names, via ``name_of_key(settings key)``.
    """
    try:
        yield
    except InputError as err:
        raise InputError(_in_user_terms(str(err), name_of_key)) from err
    except (ValueError, TypeError) as err:
        raise InputError(_in_user_terms(str(err), name_of_key)) from err


def _in_user_terms(message: str, name_of_key) -> str:
    first = message.split(" ", 1)[0].split("=", 1)[0].strip("'")
    key = LIBRARY_NAMES.get(first, first)
    if key in CONFIG_REQUIRED or key in ("devices", "check_every"):
        return f"{name_of_key(key)}: {message}"
    return message


def _gradcheck(args) -> int:
    with _precision(args.dtype):
        return _run_gradcheck(args)


def _run_gradcheck(args) -> int:
    from fnnet.gradcheck import gradcheck

    with user_input(flag_of):
        sizes = tuple(args.sizes)
        activation, output, loss = _extensions(args.activation, args.output, args.loss)
        net = MLP(sizes=sizes, activation=activation, output=output, loss=loss)
    if args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    k_params, k_x, k_y = jax.random.split(jax.random.key(args.seed), 3)
    dtype = jnp.dtype(args.dtype)
    params = net.init(k_params, dtype)
    x = jax.random.normal(k_x, (args.batch, sizes[0]), dtype)
    K = sizes[-1]
    if net.loss == "cross_entropy":
        y = jax.random.randint(k_y, (args.batch,), 0, K)
    else:
        y = jax.random.uniform(k_y, (args.batch, K), dtype)
    print(f"network {net}")
    print(gradcheck(net, params, x, y, precision=args.precision))
    return 0


def _flag_settings(args) -> dict:
    """The settings the flags give, as plain JSON values (saved to config.json)."""
    left_out = ("command", "resume", *PROCESS_FLAGS)
    settings = {k: v for k, v in vars(args).items() if k not in left_out}
    if settings["epochs"] is None:
        settings["epochs"] = DEFAULT_EPOCHS
    if settings["dropout"] is not None:
        d = settings["dropout"]
        if not 0 <= d < 1:
            raise InputError(
                f"--dropout is the drop rate and must be in [0, 1), got {d}"
            )
        settings["keep_prob"] = 1.0 - d
    settings.pop("dropout")
    if settings["keep_prob"] is None:
        settings["keep_prob"] = 1.0
    _check_dp_flags(settings)
    if settings["dp_clip"] is not None and settings["dp_delta"] is None:
        settings["dp_delta"] = DEFAULT_DP_DELTA
    if settings["checkpoint_every"] is None:
        settings["checkpoint_every"] = DEFAULT_CHECKPOINT_EVERY
    return settings


def _check_dp_flags(s: dict) -> None:
    """The DP flags' rules, in the flags' own names."""
    clip, sigma, delta = s["dp_clip"], s["dp_noise"], s["dp_delta"]
    if clip is None:
        for flag, value, off in (
            ("--dp-noise", sigma, 0.0),
            ("--dp-delta", delta, None),
        ):
            if value != off:
                raise InputError(f"{flag} {value} needs --dp-clip C (DP-SGD is off)")
        return
    if not clip > 0:
        raise InputError(f"--dp-clip must be > 0 (inf: no clipping), got {clip}")
    if not (sigma >= 0 and sigma < float("inf")):
        raise InputError(f"--dp-noise must be finite and >= 0, got {sigma}")
    if sigma > 0 and clip == float("inf"):
        raise InputError(
            f"--dp-noise {sigma} needs a finite --dp-clip (the noise's standard "
            "deviation is dp-noise x dp-clip)"
        )
    if delta is not None and not 0 < delta < 1:
        raise InputError(f"--dp-delta must lie in (0, 1), got {delta}")
    if s["grad"] != "hand":
        raise InputError(f"--dp-clip needs --grad hand, got --grad {s['grad']}")
    if s.get("devices") is not None:
        raise InputError("--dp-clip runs on one device; drop --devices")


def _check_settings(s: dict, name_of_key) -> None:
    """Checks of settings that no library constructor makes, in the user's terms."""
    checkpoint_every(s["checkpoint_every"])
    for key in ("val_fraction", "test_fraction"):
        v = s[key]
        if not (isinstance(v, (int, float)) and 0 <= v < 1):
            raise InputError(f"{name_of_key(key)} must be in [0, 1), got {v!r}")
    if s["val_fraction"] + s["test_fraction"] >= 1:
        raise InputError(
            f"{name_of_key('val_fraction')} + {name_of_key('test_fraction')} must "
            "be below 1 to leave training rows, got "
            f"{s['val_fraction']} + {s['test_fraction']}"
        )
    if s["patience"] < 0:
        raise InputError(
            f"{name_of_key('patience')} must be >= 0 (0: off), got {s['patience']}"
        )
    if not 0 <= s["seed"] < 2**63:
        raise InputError(
            f"{name_of_key('seed')} must be in [0, 2**63), got {s['seed']}"
        )
    devices = s.get("devices")
    if devices is not None and devices < 1:
        raise InputError(f"{name_of_key('devices')} must be >= 1, got {devices}")
    for key in ("lr", "momentum", "l2", "weight_decay", "noise_std", "keep_prob"):
        if not math.isfinite(s[key]):
            raise InputError(f"{name_of_key(key)} must be finite, got {s[key]}")


def _config_types() -> dict:
    """config.json key -> (check, what is expected), from the train flags."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    kinds = {}
    for a in sub.choices["train"]._actions:
        if a.dest in ("help", "resume", "dropout"):
            continue
        kinds[a.dest] = _value_kind(a)
    kinds["keep_prob"] = (lambda v: _is_number(v), "a number")
    kinds["epochs"] = (lambda v: _is_int(v), "an int")
    return kinds


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return _is_int(v) or isinstance(v, float)


def _value_kind(action):
    """(check, description) of a JSON value for an argparse action."""
    if action.nargs == 0:
        return (lambda v: isinstance(v, bool), "true or false")
    if action.nargs == "*":
        return (
            lambda v: isinstance(v, list) and all(_is_int(m) for m in v),
            "a list of ints",
        )
    base = {int: (_is_int, "an int"), float: (_is_number, "a number")}.get(
        action.type, (lambda v: isinstance(v, str), "a string")
    )
    if action.choices is not None:
        choices = list(action.choices)
        base = (lambda v: v in choices, f"one of {choices}")
    if action.type is _positive_int:
        base = (lambda v: _is_int(v) and v >= 1, "a positive int")
    if action.default is None:
        check, what = base
        return (lambda v: v is None or check(v), f"{what} or null")
    return base


def read_config(path: Path) -> dict:
    """A run folder's config.json, checked like a checkpoint: file, key, expected.

    Raises:
      InputError: the file is unreadable, not JSON, not an object, lacks a
        key of ``CONFIG_REQUIRED``, or holds a value of the wrong type.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err})") from err
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(saved, dict):
        raise InputError(
            f"{path}: expected a JSON object of settings, found a JSON "
            f"{type(saved).__name__}"
        )
    missing = [k for k in CONFIG_REQUIRED if k not in saved]
    if missing:
        raise InputError(
            f"{path}: missing key(s) {missing}; the run's settings are incomplete"
        )
    for key, (check, what) in _config_types().items():
        if key in saved and not check(saved[key]):
            raise InputError(
                f"{path}: key {key!r} must be {what}, found {saved[key]!r}"
            )
    return saved


def _resume_settings(args, given: set[str], out: Path) -> dict:
    """The saved settings of the run in ``out``, with the flags that may change.

    A flag given with --resume that differs from the saved setting is an
    error, except those of ``RESUME_MAY_CHANGE``, which are applied (and
    reported when they change).
    """
    path = out / CONFIG_FILE
    saved = read_config(path)
    # A config from before a flag existed: that flag's default.
    defaults = _flag_settings(build_parser().parse_args(["train"]))
    for key, value in defaults.items():
        saved.setdefault(key, value)
    fresh = _flag_settings(args)
    typed = {"keep_prob" if k == "dropout" else k for k in given} - {"resume"}
    differ = [
        k
        for k in sorted(typed - set(RESUME_MAY_CHANGE))
        if fresh.get(k) != saved.get(k)
    ]
    if differ:
        shown = ", ".join(
            f"{flag_of(k)} {fresh.get(k)!r} (saved: {saved.get(k)!r})" for k in differ
        )
        raise InputError(
            f"--resume {out}: flags that differ from the run's settings in {path}: "
            f"{shown}; a resumed run keeps its settings (only "
            + ", ".join(flag_of(k) for k in RESUME_MAY_CHANGE)
            + " may change): start a new run with another --out to change them"
        )
    for key in RESUME_MAY_CHANGE:
        if key in typed and fresh[key] != saved.get(key):
            if key != "quiet":
                print(
                    f"fnnet train: --resume: {flag_of(key)} changed from "
                    f"{saved.get(key)!r} to {fresh[key]!r}",
                    file=sys.stderr,
                )
            saved[key] = fresh[key]
    saved["quiet"] = args.quiet
    return saved


def _train(args, given: set[str]) -> int:
    if args.resume is not None:
        out = Path(args.resume)
        if not (out / CONFIG_FILE).is_file():
            raise InputError(f"--resume {out}: no {CONFIG_FILE} in that folder")
        # The settings are checked before the lock: a refused resume never
        # waits for, or blocks, the folder.
        s = _resume_settings(args, given, out)

        def name_of_key(key):
            return f"{out / CONFIG_FILE}: key {key!r}"

        _check_settings(s, name_of_key)
        with _run_folder(out, "--resume", created=False):
            # Killed before its first checkpoint: the run starts over.
            resume = (out / CHECKPOINT_FILE).exists()
            with _precision(s["dtype"]):
                return _run_training(s, out, resume, name_of_key)
    s = _flag_settings(args)
    _check_settings(s, flag_of)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(s["out"] or f"runs/{Path(str(s['data'])).stem}-{stamp}")
    created = not out.exists()
    with _run_folder(out, "--out", created):
        if (out / CHECKPOINT_FILE).exists():
            raise InputError(
                f"--out {out} already holds a run; use --resume {out} to continue it "
                "or choose another folder"
            )
        with _precision(s["dtype"]):
            return _run_training(s, out, False, flag_of)


@contextlib.contextmanager
def _run_folder(out: Path, flag: str, created: bool):
    """Create ``out`` and hold its lock for the run; tidy up if it never started.

    A second run on a held folder gets an InputError naming the holder (the
    lock is the kernel's flock, released when the holder exits, even by
    kill -9). If the run fails before it starts (no config.json was written)
    in a folder it created, the folder is removed again.
    """
    if not distributed.is_primary():  # several processes: process 0's folder
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(
            f"{flag} {out}: cannot create the folder: {err.strerror} ({err.filename})"
        ) from err
    fd = _lock(out, flag)
    try:
        yield
    except BaseException:
        if created and not (out / CONFIG_FILE).exists():
            with contextlib.suppress(OSError):
                (out / LOCK_FILE).unlink()
                out.rmdir()
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _lock(out: Path, flag: str) -> int | None:
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        return None
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise InputError(
            f"{flag} {out}: cannot write in the folder: {err.strerror} ({path})"
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        raise InputError(
            f"{flag} {out} is in use by another fnnet run "
            f"({holder or 'holder unknown'}); wait for it to end or choose another "
            "folder"
        ) from None
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.ftruncate(fd, 0)
    os.pwrite(
        fd,
        f"pid {os.getpid()} on {socket.gethostname()}, started {stamp}\n".encode(),
        0,
    )
    return fd


def _precision(dtype: str):
    """64-bit mode for a float64 run, for the duration of the run only."""
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def _streamed(s: dict) -> bool:
    """Whether the run streams its data from disk (see --chunk-rows)."""
    data = str(s["data"])
    if data in fdata.BUILTIN:
        if s.get("chunk_rows") is not None:
            raise InputError(
                f"--chunk-rows streams a .npy, .npz or shard folder from disk; "
                f"{data} is a bundled data set"
            )
        return False
    return s.get("chunk_rows") is not None or fstream.is_stream_path(data)


def _stream_data(s: dict, task, extensions):
    """The streamed data set, its network, and its train/val/test chunk sources."""
    ds = fstream.open_stream(
        s["data"],
        chunk_rows=s.get("chunk_rows") or fstream.DEFAULT_CHUNK_ROWS,
        task=task,
        val_fraction=s["val_fraction"],
        test_fraction=s["test_fraction"],
        seed=s["seed"],
    )
    if ds.task == "classification" and s["loss"] == "bce":
        raise InputError(
            f"--loss bce is not available for streamed data ({s['data']}); use "
            "cross_entropy"
        )
    for key, off in (("devices", None), ("check_every", None), ("dp_clip", None)):
        if s.get(key) != off:
            raise InputError(
                f"{flag_of(key)} is not available for streamed data ({s['data']})"
            )
    if s.get("log_noise_scale"):
        raise InputError(
            f"--log-noise-scale is not available for streamed data ({s['data']})"
        )
    # _network reads only the shape of the problem when no targets need recoding.
    shape = types.SimpleNamespace(
        task=ds.task,
        num_features=ds.num_features,
        num_outputs=ds.num_outputs,
        y_train=None,
        y_val=None,
        y_test=None,
    )
    net = _network(s, shape, *extensions)[0]
    val = ds.source("val") if ds.sizes[1] else None
    test = ds.source("test") if ds.sizes[2] else None
    return ds, net, ds.source("train"), val, test


def _run_training(s: dict, out: Path, resume: bool, name_of_key) -> int:
    with user_input(name_of_key):
        extensions = _extensions(s["activation"], s["output"], s["loss"])
    task = None if s["task"] == "auto" else s["task"]
    # Data problems raise DataError, an InputError.
    if _streamed(s):
        with user_input(name_of_key):
            ds, net, train_data, val_data, test_data = _stream_data(s, task, extensions)
        n_train = ds.sizes[0]
    else:
        ds = fdata.load_dataset(
            s["data"],
            target=_target(s["target"]),
            task=task,
            val_fraction=s["val_fraction"],
            test_fraction=s["test_fraction"],
            seed=s["seed"],
        )
        with user_input(name_of_key):
            net, y_tr, y_va, y_te = _network(s, ds, *extensions)
        val_data = (ds.x_val, y_va) if len(ds.x_val) > 0 else None
        train_data, test_data = (ds.x_train, y_tr), (ds.x_test, y_te)
        if not len(ds.x_test):  # --test-fraction 0: nothing to test on
            test_data = None
        n_train = len(ds.x_train)
    with user_input(name_of_key):
        config = TrainConfig(
            epochs=s["epochs"],
            batch_size=s["batch_size"],
            learning_rate=s["lr"],
            optimizer=s["optimizer"],
            momentum=s["momentum"],
            l2=s["l2"],
            weight_decay=s["weight_decay"],
            decay_biases=s["decay_biases"],
            noise_std=s["noise_std"],
            patience=s["patience"] or None,
            grad=s["grad"],
            seed=s["seed"],
            dp_clip=s["dp_clip"],
            dp_noise=s["dp_noise"],
            dp_delta=s["dp_delta"],
        )
    has_val = val_data is not None
    if config.patience is not None and not has_val:
        raise InputError("--patience needs a validation split (--val-fraction > 0)")
    if s.get("devices") is not None:
        with user_input(name_of_key):
            n_dev = batch_sharding(s["devices"]).mesh.size
        if min(config.batch_size, n_train) % n_dev:
            raise InputError(
                f"{name_of_key('batch_size')} {config.batch_size} does not split "
                f"evenly over {n_dev} devices; choose a multiple of {n_dev}"
            )
    if jax.process_count() > 1:
        _check_processes(s, config, n_train, name_of_key)
    fingerprint = data_fingerprint(s, ds)
    if "fingerprint" in s:
        _check_fingerprint(s["fingerprint"], fingerprint, s["data"], out)
    elif name_of_key is not flag_of:  # resuming a run from an older fnnet
        print(
            f"fnnet train: warning: {out / CONFIG_FILE} has no data fingerprint "
            "(written by an older fnnet); the data cannot be checked",
            file=sys.stderr,
        )
    s = {**s, "fingerprint": fingerprint}
    params = net.init(jax.random.key(s["seed"]), dtype=jnp.dtype(s["dtype"]))

    # The run starts: its settings are written (atomically), replacing any
    # config.json a failed start left. Over several processes, by process 0.
    try:
        if distributed.is_primary():
            _write_text(out / CONFIG_FILE, json.dumps(s, indent=2) + "\n")
    except OSError as err:
        raise InputError(f"cannot write {out / CONFIG_FILE}: {err.strerror}") from err
    try:
        return _fit_and_report(
            s, out, resume, ds, net, (train_data, val_data, test_data), config, params
        )
    except KeyboardInterrupt:
        print(
            f"fnnet train: interrupted. {_kept(out)}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except OSError as err:
        where = err.filename or out
        print(
            f"fnnet train: error: {where}: {err.strerror or err}. {_kept(out)}",
            file=sys.stderr,
        )
        return EXIT_USAGE


def _check_processes(s: dict, config: TrainConfig, n_train: int, name_of_key):
    """What a run over several processes cannot do, as InputErrors."""
    n_dev, n = jax.device_count(), jax.process_count()
    if s.get("dp_clip") is not None:
        raise InputError(f"{name_of_key('dp_clip')} runs in one process; {n} joined")
    if _streamed(s):
        raise InputError(f"streamed data ({s['data']}) runs in one process; {n} joined")
    if s.get("devices") not in (None, n_dev):
        raise InputError(
            f"{name_of_key('devices')} over {n} processes must be left out or "
            f"{n_dev} (every device of every process), got {s['devices']}"
        )
    if min(config.batch_size, n_train) % n_dev:
        raise InputError(
            f"{name_of_key('batch_size')} {config.batch_size} does not split evenly "
            f"over the {n_dev} devices of {n} processes; choose a multiple of {n_dev}"
        )


def _kept(out: Path) -> str:
    """What a stopped run leaves, and the command that resumes it."""
    command = f"fnnet train --resume {shlex.quote(str(out))}"
    path = out / CHECKPOINT_FILE
    try:
        epoch = ckpt.load_meta(path)["epoch"]
    except (ckpt.CheckpointError, KeyError, OSError):
        return f"No checkpoint was written yet; start the run again with: {command}"
    return f"The checkpoint of epoch {epoch} is kept in {path}; resume with: {command}"


def data_fingerprint(s: dict, ds) -> dict:
    """What identifies a run's data: the source's bytes and the split's arrays.

    ``source``: sha256 of the data file (of the name, for a builtin);
    ``split``: sha256 of the standardized train/validation/test arrays, which
    changes with the rows, the fractions, the seed or the target column.
    """
    source = hashlib.sha256()
    path = Path(str(s["data"]))
    if s["data"] in fdata.BUILTIN:
        source.update(str(s["data"]).encode())
    else:  # a file, or a folder of shards (streamed)
        files = (
            sorted(p for p in path.iterdir() if p.is_file())
            if path.is_dir()
            else [path]
        )
        for file in files:
            source.update(file.name.encode())
            with open(file, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    source.update(chunk)
    split = hashlib.sha256()
    if isinstance(ds, fstream.StreamData):
        # The split is drawn row by row while streaming: its sizes and the
        # training rows' statistics identify it.
        rows = list(ds.sizes)
        arrays = (np.asarray(rows), ds.x_mean, ds.x_std, ds.y_mean, ds.y_std)
    else:
        rows = [len(ds.x_train), len(ds.x_val), len(ds.x_test)]
        arrays = (ds.x_train, ds.y_train, ds.x_val, ds.y_val, ds.x_test, ds.y_test)
    for a in arrays:
        a = np.ascontiguousarray(np.asarray([] if a is None else a))
        split.update(f"{a.dtype.str}{a.shape}".encode())
        split.update(a.tobytes())
    return {"source": source.hexdigest(), "split": split.hexdigest(), "rows": rows}


def _check_fingerprint(saved, now: dict, data, out: Path) -> None:
    if not isinstance(saved, dict):
        raise InputError(
            f"{out / CONFIG_FILE}: key 'fingerprint' must be an object, found {saved!r}"
        )
    rows = f"train/validation/test rows {saved.get('rows')} then, {now['rows']} now"
    if saved.get("source") != now["source"]:
        raise InputError(
            f"--resume {out}: the data changed since the run started: {data} "
            f"has sha256 {now['source'][:16]}..., the run started with "
            f"{str(saved.get('source'))[:16]}... ({rows}); a resumed run must see "
            "the same data, or test rows could leak into training: start a new run"
        )
    if saved.get("split") != now["split"]:
        raise InputError(
            f"--resume {out}: the train/validation/test split differs from the one "
            f"the run started with ({rows}); check val_fraction, test_fraction, "
            f"seed and target in {out / CONFIG_FILE}"
        )


def _fit_and_report(s, out, resume, ds, net, data, config, params) -> int:
    """Train on arrays or chunk sources, then write the run's files.

    ``ds`` is the :class:`fnnet.data.Dataset` or, streamed, the
    :class:`fnnet.stream.StreamData` (the same statistics and classes).
    """
    train_data, val_data, test_data = data
    every_epochs, every_seconds = checkpoint_every(s["checkpoint_every"])
    # Over several processes only process 0 writes files and shows progress.
    primary = distributed.is_primary()
    bar = _progress(config.epochs, quiet=s["quiet"] or not primary)
    if resume and bar is not None:
        bar.update(ckpt.load_meta(out / CHECKPOINT_FILE)["epoch"])

    grad_columns = grad_check_columns(net)
    shown_at = [-PROGRESS_SECONDS]

    def on_epoch(rec):
        if bar is not None:
            bar.update(1)
            now = time.monotonic()
            if now - shown_at[0] < PROGRESS_SECONDS:
                return  # the numbers are refreshed a few times a second at most
            shown_at[0] = now
            shown = {k: v for k, v in rec.items() if k not in grad_columns[:-1]}
            bar.set_postfix(
                {k: f"{v:.4g}" for k, v in shown.items() if k != "epoch"},
                refresh=False,
            )

    result = fit(
        net,
        params,
        train_data,
        val_data,
        config,
        checkpoint=out / CHECKPOINT_FILE,
        resume=resume,
        on_epoch=on_epoch,
        devices=s.get("devices"),
        check_every=s["check_every"],
        checkpoint_info={"settings": s, "model": _model_record(s, ds, net)},
        log_noise_scale=s["log_noise_scale"],
        checkpoint_every=every_epochs,
        checkpoint_seconds=every_seconds,
    )
    if bar is not None:
        bar.close()
    if not primary:
        return EXIT_NON_FINITE if result.stopped == "non_finite" else 0
    metric = metric_name(net)
    if isinstance(test_data, tuple):
        test = evaluate(net, result.params, *test_data)
    elif test_data is not None:
        test = evaluate_chunks(net, result.params, test_data)
    else:  # --test-fraction 0: nothing to test on
        test = {"loss": None, metric: None}
    metrics = {
        f"test_{metric}": test[metric],
        "test_loss": test["loss"],
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped": result.stopped,
        "train_seconds": round(result.train_seconds, 4),
        "device": f"{jax.devices()[0].platform} x{_devices_used(s)}",
        "processes": jax.process_count(),
        "config": s,
    }
    if result.history:
        last_best = result.history[result.best_epoch - 1]
        metrics.update({k: v for k, v in last_best.items() if k.startswith("val_")})
    checked = s["check_every"] is not None or any(
        grad_columns[-1] in r for r in result.history
    )
    if checked:
        metrics.update(grad_check_summary(result.history))
    if config.dp_clip is not None:
        metrics.update(_dp_metrics(config, len(ds.x_train), result))
    _write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    columns = _history_columns(result.history, metric, grad_columns if checked else [])
    _write_history(out / "history.csv", result.history, columns)
    _plot(out / "loss_curve.png", result.history, s["data"])
    shown = {k: "n/a" if v is None else f"{v:.4f}" for k, v in test.items()}
    print(
        f"test_{metric}={shown[metric]} test_loss={shown['loss']} "
        f"epochs={result.epochs_run} "
        f"best_epoch={result.best_epoch} time={result.train_seconds:.2f}s -> {out}"
    )
    if result.stopped == "non_finite":
        print(f"fnnet train: {result.message}", file=sys.stderr)
        return EXIT_NON_FINITE
    return 0


def _dp_metrics(config: TrainConfig, n: int, result) -> dict:
    """What metrics.json says about DP-SGD: the epsilon spent and how."""
    q, steps = poisson_schedule(n, config.batch_size)
    eps = result.history[-1].get("dp_epsilon") if result.history else None
    return {
        "dp_epsilon": eps,  # null without noise: no finite guarantee
        "dp": {
            "delta": config.dp_delta,
            "clip": config.dp_clip,
            "noise_multiplier": config.dp_noise,
            "sampling": "poisson",
            "sample_rate": q,
            "steps": steps * result.epochs_run,
            "accountant": ACCOUNTANT,
        },
    }


def _devices_used(s: dict) -> int:
    """Devices the run trained on: every device when over several processes."""
    if jax.process_count() > 1:
        return jax.device_count()
    return s.get("devices") or 1


def _target(value):
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


def _is_spec(value) -> bool:
    return isinstance(value, str) and ":" in value


def _import_spec(flag: str, spec: str):
    """The object an import spec ``package.module:attribute`` names, checked.

    The current directory is importable (put first on ``sys.path`` when it is
    not there). Errors are ValueErrors that name the flag and the spec.
    """
    module_name, _, attr = spec.partition(":")
    kinds, what = SPEC_KINDS[flag]
    if not module_name or not attr:
        raise ValueError(
            f"{flag} {spec!r}: an import spec is package.module:attribute, naming "
            f"{what}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"{flag} {spec!r}: cannot import module {module_name!r} ({err})"
        ) from err
    except Exception as err:  # the user's module failed while it was imported
        raise ValueError(
            f"{flag} {spec!r}: importing module {module_name!r} failed: "
            f"{type(err).__name__}: {err}"
        ) from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"{flag} {spec!r}: module {module_name!r} has no attribute {attr!r}"
            )
        obj = getattr(obj, part)
    if not isinstance(obj, kinds):
        raise ValueError(
            f"{flag} {spec!r}: {attr} is of type {type(obj).__name__}, not {what}"
        )
    return obj


def _extensions(activation: str, output: str | None, loss: str | None):
    """The --activation, --output and --loss values with import specs resolved.

    Built-in names pass through (the network checks them); an unknown output
    or loss name is rejected here, naming its flag.
    """
    acts = tuple(
        _import_spec("--activation", a) if _is_spec(a) else a
        for a in activation.split(",")
    )
    resolved = [acts if len(acts) > 1 else acts[0]]
    for flag, value, names in (
        ("--output", output, OUTPUT_ACTIVATIONS),
        ("--loss", loss, LOSSES),
    ):
        if _is_spec(value):
            value = _import_spec(flag, value)
        elif value is not None and value not in names:
            raise ValueError(
                f"{flag} {value!r} is not supported; choose one of "
                f"{', '.join(names)} or give an import spec package.module:attribute"
            )
        resolved.append(value)
    return tuple(resolved)


def _network(s: dict, ds, activation, output, loss):
    """The MLP for the settings and data set, and the targets in its format.

    ``activation``, ``output`` and ``loss`` are the settings' values with
    import specs resolved (see :func:`_extensions`).
    """
    if isinstance(loss, Loss) and ds.task != "regression":
        raise ValueError(
            f"--loss {s['loss']!r}: a user's fnnet.Loss takes float targets shaped "
            f"like the output, so it needs a regression task; {s['data']} is a "
            "classification task (use --task regression for numeric targets)"
        )
    loss = loss or ("cross_entropy" if ds.task == "classification" else "mse")
    output = output or {"cross_entropy": "softmax", "bce": "sigmoid"}.get(
        loss, "identity"
    )
    ys = (ds.y_train, ds.y_val, ds.y_test)
    n_out = ds.num_outputs
    if ds.task == "classification" and loss == "bce":
        if ds.num_outputs != 2:
            raise ValueError(
                f"--loss bce needs two classes, {s['data']} has {ds.num_outputs}; "
                "use cross_entropy"
            )
        n_out = 1  # one sigmoid unit: P(class 1)
        ys = tuple(y.astype(np.float32)[:, None] for y in ys)
    elif ds.task == "classification" and loss != "cross_entropy":
        raise ValueError(
            f"--loss {loss} does not fit classification; use cross_entropy or bce"
        )
    elif ds.task == "regression" and loss in ("bce", "cross_entropy"):
        raise ValueError(f"--loss {loss} needs a classification task; use mse")
    net = MLP(
        sizes=(ds.num_features, *s["hidden"], n_out),
        activation=activation,
        output=output,
        loss=loss,
        keep_prob=s["keep_prob"],
        precision=s.get("precision"),
    )
    return (net, *ys)


def _progress(total: int, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an optional dependency
        return None
    return tqdm(total=total, unit="epoch", dynamic_ncols=True)


def _write_text(path: Path, text: str) -> None:
    """Write a file atomically: a temporary file in the same folder, then rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _history_columns(
    history: list[dict], metric: str, grad_columns: list[str]
) -> list[str]:
    """history.csv's columns in a fixed order, whatever the records' key order.

    (Records read back from a checkpoint have their keys sorted.) The known
    columns first, then the gradient check's (all of them whenever checks were
    asked for, empty in epochs without one), then any others.
    """
    present = dict.fromkeys(k for rec in history for k in rec)
    known = ["epoch", "batch_loss", "train_loss", f"train_{metric}"]
    known += ["val_loss", f"val_{metric}"]
    columns = [k for k in known if k in present] + list(grad_columns)
    return columns + [k for k in present if k not in columns]


def _write_history(path: Path, history: list[dict], columns: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)


def _plot(path: Path, history: list[dict], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is an optional dependency
        print(
            "fnnet train: matplotlib not installed, no loss_curve.png", file=sys.stderr
        )
        return
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_loss"] for r in history], label="train")
    if history and "val_loss" in history[0]:
        ax.plot(epochs, [r["val_loss"] for r in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cost J (mean loss per example)")
    ax.set_title(f"fnnet train: {Path(str(title)).name}")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------ fnnet sweep


def number_list(flag: str, text: str, kind=float) -> list:
    """A comma list of numbers (``1e-3,3e-3``); InputError naming ``flag``."""
    try:
        values = [kind(part) for part in str(text).split(",")]
    except ValueError:
        what, example = ("ints", "0,1,2") if kind is int else ("numbers", "1e-3,1e-2")
        raise InputError(
            f"{flag} takes a comma list of {what} (e.g. {example}), got {text!r}"
        ) from None
    return values


def seed_list(text: str) -> list[int]:
    """``--seeds``: ``0-7`` (both ends included) or a comma list ``0,3,5``."""
    value = str(text).strip()
    if "-" in value.lstrip("-"):
        lo, _, hi = value.partition("-")
        try:
            a, b = int(lo), int(hi)
        except ValueError:
            a = b = -1
        if 0 <= a <= b:
            return list(range(a, b + 1))
        raise InputError(
            f"--seeds takes a range A-B with 0 <= A <= B (e.g. 0-7) or a comma "
            f"list of ints >= 0, got {text!r}"
        )
    seeds = number_list("--seeds", value, int)
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds must be distinct ints >= 0, got {text!r}")
    return seeds


def add_data_flags(parser) -> None:
    """The data flags of fnnet train and fnnet sweep: the set, target, task, split."""
    parser.add_argument(
        "--data", default="digits", help="bundled data set name or file"
    )
    parser.add_argument(
        "--target",
        default=None,
        help="csv target column: name or index (default: the last column)",
    )
    parser.add_argument(
        "--task",
        choices=("auto", *fdata.TASKS),
        default="auto",
        help="classification or regression; auto infers it from the targets",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=fdata.VAL_FRACTION,
        help="validation share",
    )
    parser.add_argument(
        "--test-fraction", type=float, default=fdata.TEST_FRACTION, help="test share"
    )


def add_sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="train every combination of seeds and settings as one vmapped population",
        description=(
            "Train every combination of --seeds and the comma lists of --lr, --l2, "
            "--weight-decay, --keep-prob and --noise-std in one compiled call per "
            "epochs, each member with its own early stopping. The data are split "
            "once (--split-seed). Each --hidden flag is an architecture and its "
            "own group (one population per group). Writes results.csv, results.md, "
            "members.csv, best.json and val_curves.png to --out."
        ),
        formatter_class=HelpFormatter,
    )
    add_data_flags(p)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the data split")
    p.add_argument(
        "--hidden",
        action=ListsFlag,
        nargs="*",
        default=None,
        metavar="M",
        help="hidden layer widths as for fnnet train (--hidden 64,64 or --hidden "
        "64 64: two layers; --hidden alone: a linear model); repeat the flag to "
        "sweep architectures, one group each: --hidden 128 --hidden 64,64 "
        "(default: 128)",
    )
    p.add_argument("--activation", default="relu", help="hidden activation")
    p.add_argument("--output", default=None, help="output activation")
    p.add_argument("--loss", default=None, help="per-example loss")
    p.add_argument(
        "--dtype", choices=("float32", "float64"), default="float32", help=DTYPE_HELP
    )
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=TRAIN_DEFAULTS["optimizer"],
        help="update rule",
    )
    p.add_argument(
        "--lr",
        default=str(TRAIN_DEFAULTS["learning_rate"]),
        help="learning rates, comma list",
    )
    p.add_argument("--l2", default="0", help="L2 strengths, comma list")
    p.add_argument("--weight-decay", default="0", help="weight decays, comma list")
    p.add_argument("--keep-prob", default="1", help="dropout keep probabilities")
    p.add_argument("--noise-std", default="0", help="input noise stds, comma list")
    p.add_argument("--seeds", default="0-4", help="seeds: A-B or a comma list")
    p.add_argument(
        "--momentum",
        type=float,
        default=TRAIN_DEFAULTS["momentum"],
        help="momentum/nesterov",
    )
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="maximum epochs")
    p.add_argument(
        "--batch-size",
        type=int,
        default=TRAIN_DEFAULTS["batch_size"],
        help="mini-batch size",
    )
    p.add_argument(
        "--grad",
        choices=GRADS,
        default=TRAIN_DEFAULTS["grad"],
        help="gradient source",
    )
    p.add_argument(
        "--decay-biases", action="store_true", help="apply L2/decay to biases too"
    )
    p.add_argument(
        "--patience",
        type=int,
        default=TRAIN_DEFAULTS["patience"] or 0,
        help="early stopping patience (0: off)",
    )
    p.add_argument(
        "--out", default=None, help="output folder (default: runs/sweep-<data>-<time>)"
    )


def _sweep(args) -> int:
    with _precision(args.dtype):
        return _run_sweep(args)


def _run_sweep(args) -> int:
    from fnnet import sweep as fsweep

    settings = {
        "learning_rate": number_list("--lr", args.lr),
        "l2": number_list("--l2", args.l2),
        "weight_decay": number_list("--weight-decay", args.weight_decay),
        "keep_prob": number_list("--keep-prob", args.keep_prob),
        "noise_std": number_list("--noise-std", args.noise_std),
    }
    seeds = seed_list(args.seeds)
    groups = [tuple(h) for h in (args.hidden or [[128]])]
    if args.patience < 0:
        raise InputError(f"--patience must be >= 0, got {args.patience}")
    with user_input(flag_of):
        extensions = _extensions(args.activation, args.output, args.loss)
    task = None if args.task == "auto" else args.task
    ds = fdata.load_dataset(
        args.data,
        target=_target(args.target),
        task=task,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.split_seed,
    )
    if len(ds.x_val) == 0:
        raise InputError("fnnet sweep needs a validation split (--val-fraction > 0)")
    with user_input(flag_of):
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=settings["learning_rate"][0],
            optimizer=args.optimizer,
            momentum=args.momentum,
            decay_biases=args.decay_biases,
            patience=args.patience or None,
            grad=args.grad,
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"runs/sweep-{Path(str(args.data)).stem}-{stamp}")
    if (out / "results.csv").exists():
        raise InputError(f"--out {out} already holds a sweep; choose another folder")
    dtype = jnp.dtype(args.dtype)
    rows, member_rows, curves = [], [], []
    best = None
    for hidden in groups:
        s = {**vars(args), "hidden": list(hidden), "keep_prob": 1.0}
        with user_input(flag_of):
            net, y_tr, y_va, y_te = _network(s, ds, *extensions)
        result = fsweep.fit_sweep(
            net,
            (ds.x_train, y_tr),
            (ds.x_val, y_va),
            config,
            seeds=seeds,
            dtype=dtype,
            **settings,
        )
        arch = ",".join(map(str, hidden)) or "none"
        group_rows = fsweep.summary(result)
        for row in group_rows:
            row["hidden"] = arch
            row["seconds"] = result.train_seconds
        rows += group_rows
        loss, metric = result.best_values()
        for m, member in enumerate(result.members):
            member_rows.append(
                {
                    "hidden": arch,
                    **member,
                    "val_loss": float(loss[m]),
                    f"val_{result.metric}": float(metric[m]),
                    "best_epoch": int(result.best_epoch[m]),
                    "epochs_run": int(result.epochs_run[m]),
                    "stopped": result.stopped[m],
                }
            )
        for row in group_rows:
            # Mean over the seeds still running at each epoch.
            block = result.val_loss[row["members"]]
            running = np.sum(np.isfinite(block), axis=0)
            total = np.sum(np.where(np.isfinite(block), block, 0.0), axis=0)
            mean_curve = np.where(running > 0, total / np.maximum(running, 1), np.nan)
            curves.append((_combo_label(row), mean_curve))
        top = fsweep.best_row(group_rows)
        if best is None or top["val_loss_mean"] < best[0]["val_loss_mean"]:
            best = (top, net, result, y_te)
        print(
            f"group --hidden {arch}: {len(result.members)} members in one population, "
            f"{result.train_seconds:.2f}s"
        )
    top, net, result, y_te = best
    # The test set, once: the best combination's members (one per seed).
    scores = [
        evaluate(
            net, jax.tree.map(lambda leaf, m=m: leaf[m], result.params), ds.x_test, y_te
        )
        for m in top["members"]
    ]
    metric = result.metric
    test_values = np.array([sc[metric] for sc in scores])
    best_json = {
        "hidden": top["hidden"],
        **{k: top[k] for k in fsweep.SWEPT},
        "seeds": seeds,
        "val_loss_mean": top["val_loss_mean"],
        "val_loss_std": top["val_loss_std"],
        f"test_{metric}_mean": float(np.mean(test_values)),
        f"test_{metric}_std": float(np.std(test_values)),
        f"test_{metric}_per_seed": test_values.tolist(),
    }
    out.mkdir(parents=True, exist_ok=True)
    columns = ["hidden", *fsweep.SWEPT, "seeds"]
    columns += [k for k in rows[0] if k not in columns and k != "members"]
    _write_rows(out / "results.csv", rows, columns)
    _write_rows(out / "members.csv", member_rows, list(member_rows[0]))
    _write_text(out / "results.md", _markdown(rows, metric) + "\n")
    _write_text(out / "best.json", json.dumps(best_json, indent=2) + "\n")
    _plot_curves(out / "val_curves.png", curves, args.data)
    print(_markdown(rows, metric))
    print(
        f"best: --hidden {top['hidden']} "
        + " ".join(f"{k}={top[k]:g}" for k in fsweep.SWEPT)
        + f" val_loss={top['val_loss_mean']:.4f}±{top['val_loss_std']:.4f} "
        f"test_{metric}={np.mean(test_values):.4f}±{np.std(test_values):.4f} "
        f"(over {len(seeds)} seeds) -> {out}"
    )
    return 0


def _combo_label(row: dict) -> str:
    from fnnet.sweep import SWEPT

    short = {
        "learning_rate": "lr",
        "weight_decay": "wd",
        "keep_prob": "p",
        "noise_std": "noise",
    }
    return f"[{row['hidden']}] " + " ".join(
        f"{short.get(k, k)}={row[k]:g}" for k in SWEPT
    )


def _markdown(rows: list[dict], metric: str) -> str:
    from fnnet.sweep import SWEPT

    head = ["hidden", "lr", "l2", "weight decay", "keep prob", "noise", "seeds"]
    head += ["val loss", f"val {metric}", "best epoch", "epochs run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["hidden"], *(f"{r[k]:g}" for k in SWEPT), str(r["seeds"])]
        cells += [
            f"{r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f}",
            f"{r[f'val_{metric}_mean']:.4f} ± {r[f'val_{metric}_std']:.4f}",
            f"{r['best_epoch_mean']:.1f}",
            f"{r['epochs_run_mean']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_rows(path: Path, rows: list[dict], columns: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _plot_curves(path: Path, curves, title) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is an optional dependency
        print(
            "fnnet sweep: matplotlib not installed, no val_curves.png", file=sys.stderr
        )
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves:
        epochs = np.arange(1, len(curve) + 1)
        ax.plot(epochs, curve, label=label, linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title(f"fnnet sweep: {Path(str(title)).name}")
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
