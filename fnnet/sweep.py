"""Sweeps: every combination of seeds and settings, trained as one population.

A sweep trains one network architecture with every combination of seeds and
continuous settings (learning rate, L2, weight decay, keep probability,
input noise) as ONE ``jax.vmap``-ed population: each compiled call runs
``epochs_per_call`` epochs of every member, with its evaluation and its own
early stopping (:func:`fnnet.train.run_epochs`). A member that stops keeps
its best parameters; the others go on.

Member m is the run :func:`fnnet.train.fit` makes with
``net.init(jax.random.key(seed))``, ``TrainConfig(seed=seed, ...)`` and the
member's settings on the same data (:func:`single_run_settings` gives its
network and config). The members read their settings as traced values
(:class:`fnnet.train.Hyper`); a setting of 0 (or keep probability 1) leaves a
member's numbers as a run without it would have them.

Settings that change shapes (widths, depth) cannot share one ``vmap``:
run one sweep per architecture (``fnnet sweep --hidden 128 --hidden 64,64`` does
that, group by group).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fnnet.errors import InputError, InputTypeError
from fnnet.network import MLP
from fnnet.train import (
    EPOCHS_PER_CALL,
    NO_PATIENCE,
    Hyper,
    TrainConfig,
    check_finite_data,
    init_carry,
    init_state,
    make_optimizer,
    metric_name,
    run_epochs,
    to_device,
    unit_rate_optimizer,
)
from fnnet.types import Array, Params

#: The settings a sweep varies across members, in the order of its table.
SWEPT = ("learning_rate", "l2", "weight_decay", "keep_prob", "noise_std")


@dataclasses.dataclass
class SweepResult:
    """A sweep's members (M of them), in the order of ``members``.

    members: per member ``{"seed": s, "learning_rate": ..., ...}``.
    params: stacked (leading axis M): with early stopping each member's best
      parameters, otherwise its last.
    val_loss, val_metric, train_loss: (M, epochs) curves, NaN where a member
      did not run that epoch.
    best_epoch, epochs_run: (M,) ints. stopped: per member "completed",
      "early_stopping" or "non_finite".
    """

    members: list[dict]
    params: Params
    val_loss: np.ndarray
    val_metric: np.ndarray
    train_loss: np.ndarray
    best_epoch: np.ndarray
    epochs_run: np.ndarray
    stopped: list[str]
    metric: str
    train_seconds: float

    def best_values(self) -> tuple[np.ndarray, np.ndarray]:
        """Each member's validation loss and metric at its best epoch."""
        rows = np.arange(len(self.members))
        at = np.maximum(self.best_epoch - 1, 0)
        return self.val_loss[rows, at], self.val_metric[rows, at]


def members_of(seeds: Sequence[int], **settings: Sequence[float]) -> list[dict]:
    """Every combination, seeds outermost: ``[{"seed": s, name: value, ...}]``."""
    names = list(settings)
    return [
        {"seed": seed, **dict(zip(names, values, strict=True))}
        for seed, *values in itertools.product(seeds, *settings.values())
    ]


def single_run_settings(
    net: MLP, config: TrainConfig, member: dict
) -> tuple[MLP, TrainConfig]:
    """The network and config of the single :func:`fit` run a member equals."""
    values = {k: v for k, v in member.items() if k in SWEPT and k != "keep_prob"}
    run_net = net
    if "keep_prob" in member:
        run_net = dataclasses.replace(net, keep_prob=member["keep_prob"])
    return run_net, dataclasses.replace(config, seed=member["seed"], **values)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def run_epochs_many(
    net,
    config,
    optimizer,
    count,
    carries,
    X,
    Y,
    val,
    base_keys,
    first,
    last,
    patience,
    hypers,
):
    """:func:`fnnet.train.run_epochs` of every member in one call (vmap)."""

    def one(carry, key, hyper):
        return run_epochs(
            net,
            config,
            optimizer,
            count,
            carry,
            X,
            Y,
            val,
            key,
            first,
            last,
            patience,
            hyper=hyper,
        )

    return jax.vmap(one)(carries, base_keys, hypers)


def fit_sweep(
    net: MLP,
    train: tuple[Array, Array],
    val: tuple[Array, Array] | None,
    config: TrainConfig,
    *,
    seeds: Sequence[int] = (0,),
    learning_rate: Sequence[float] | None = None,
    l2: Sequence[float] | None = None,
    weight_decay: Sequence[float] | None = None,
    keep_prob: Sequence[float] | None = None,
    noise_std: Sequence[float] | None = None,
    dtype=jnp.float32,
    epochs_per_call: int = EPOCHS_PER_CALL,
) -> SweepResult:
    """Train every combination of ``seeds`` and the given settings at once.

    Args:
      net: the architecture (its ``keep_prob`` is the default keep probability).
      train, val: (x, y) arrays as for :func:`fnnet.train.fit`; ``val`` is
        needed for early stopping (``config.patience``) and the curves.
      config: the shared settings (optimizer, batch size, epochs, patience,
        gradient source, ...); its values of the swept settings are the
        defaults of those not given.
      seeds: member seeds: seed s initialises with ``net.init(key(s))`` and
        drives shuffling, dropout and noise as ``config.seed = s`` would.
      learning_rate, l2, weight_decay, keep_prob, noise_std: the values to
        try (each a non-empty sequence; None: the config's or net's value).
      dtype: the parameters' dtype.
      epochs_per_call: epochs per compiled call (results do not depend on it).

    Returns:
      A :class:`SweepResult`, members in the order of :func:`members_of`.
    """
    given = {
        "learning_rate": learning_rate,
        "l2": l2,
        "weight_decay": weight_decay,
        "keep_prob": keep_prob,
        "noise_std": noise_std,
    }
    values = {}
    for name, seq in given.items():
        default = net.keep_prob if name == "keep_prob" else getattr(config, name)
        values[name] = _values(name, seq, default)
    seeds = _seeds(seeds)
    if config.patience is not None and val is None:
        raise InputError("config.patience needs a validation split, got val=None")
    if isinstance(epochs_per_call, bool) or not isinstance(epochs_per_call, int):
        raise InputError(
            f"epochs_per_call must be a positive int, got {epochs_per_call!r}"
        )
    if epochs_per_call < 1:
        raise InputError(
            f"epochs_per_call must be a positive int, got {epochs_per_call!r}"
        )
    if config.dp_clip is not None:
        raise InputError(
            "fit_sweep does not run DP-SGD (config.dp_clip is set); train DP runs "
            "one by one with fit"
        )
    members = members_of(seeds, **values)
    for member in members:  # each member's settings pass the usual checks
        try:
            single_run_settings(net, config, member)
        except (ValueError, TypeError) as err:  # the network's or the config's
            raise InputError(str(err)) from err
    # The population's static switches: on when any member needs them.
    pop_net = dataclasses.replace(net, keep_prob=min(values["keep_prob"]))
    pop_config = dataclasses.replace(
        config,
        l2=max(values["l2"]),
        weight_decay=max(values["weight_decay"]),
        noise_std=max(values["noise_std"]),
    )
    optimizer = make_optimizer(pop_config)
    if optimizer is not None:
        optimizer = unit_rate_optimizer(pop_config)

    params = _stack([net.init(jax.random.key(m["seed"]), dtype) for m in members])
    member0 = jax.tree.map(lambda leaf: leaf[0], params)
    X, Y = to_device(net, member0, *net.validate(member0, *train, batch=True))
    check_finite_data("train", X, Y)
    if val is not None:
        val = to_device(net, member0, *net.validate(member0, *val))
        check_finite_data("val", *val)
    keys = jnp.stack([jax.random.key(m["seed"]) for m in members])
    hypers = Hyper(
        *(jnp.asarray([float(m[name]) for m in members]) for name in Hyper._fields)
    )
    states = jax.vmap(lambda p: init_state(p, optimizer))(params)
    carries = jax.vmap(init_carry)(states, params)
    patience = NO_PATIENCE if config.patience is None else config.patience

    M, E = len(members), config.epochs
    curves = {
        k: np.full((M, E), np.nan) for k in ("val_loss", "val_metric", "train_loss")
    }
    best_epoch = np.zeros(M, np.int64)
    epochs_run = np.zeros(M, np.int64)
    stopped = ["completed"] * M
    step_config = pop_config.step_part()
    start = time.perf_counter()
    first = 1
    while first <= E:
        carries, rec = run_epochs_many(
            pop_net,
            step_config,
            optimizer,
            epochs_per_call,
            carries,
            X,
            Y,
            val,
            keys,
            jnp.int32(first),
            jnp.int32(E),
            jnp.int32(min(patience, NO_PATIENCE)),
            hypers,
        )
        rec = jax.device_get(rec)
        for m, i in zip(*np.nonzero(rec.ran), strict=True):
            epoch = first + int(i)
            if not rec.ok[m, i]:
                stopped[m] = "non_finite"
                continue
            epochs_run[m] = epoch
            curves["train_loss"][m, epoch - 1] = rec.train_loss[m, i]
            curves["val_loss"][m, epoch - 1] = rec.val_loss[m, i]
            curves["val_metric"][m, epoch - 1] = rec.val_metric[m, i]
            if rec.improved[m, i]:
                best_epoch[m] = epoch
        first += epochs_per_call
        done, bad = jax.device_get((carries.done, carries.bad_epochs))
        if np.all(done | (bad >= patience)):
            break
    done, bad = jax.device_get((carries.done, carries.bad_epochs))
    for m in range(M):
        if stopped[m] != "non_finite" and bad[m] >= patience and epochs_run[m] < E:
            stopped[m] = "early_stopping"
    final = carries.best_params if config.patience is not None else carries.state.params
    jax.block_until_ready(final)
    return SweepResult(
        members=members,
        params=final,
        val_loss=curves["val_loss"],
        val_metric=curves["val_metric"],
        train_loss=curves["train_loss"],
        best_epoch=best_epoch,
        epochs_run=epochs_run,
        stopped=stopped,
        metric=metric_name(net),
        train_seconds=time.perf_counter() - start,
    )


def summary(result: SweepResult) -> list[dict]:
    """One row per combination of settings: mean and std over its seeds.

    Each row has the settings, ``seeds`` (how many), and the mean and
    (population) std over seeds of the validation loss and metric at each
    member's best epoch, and the mean best epoch and epochs run.
    """
    loss, metric = result.best_values()
    groups: dict[tuple, list[int]] = {}
    for m, member in enumerate(result.members):
        key = tuple((k, v) for k, v in member.items() if k != "seed")
        groups.setdefault(key, []).append(m)
    rows = []
    for key, idx in groups.items():
        row = dict(key)
        row["seeds"] = len(idx)
        for name, values in (("val_loss", loss), (f"val_{result.metric}", metric)):
            row[f"{name}_mean"] = float(np.mean(values[idx]))
            row[f"{name}_std"] = float(np.std(values[idx]))
        row["best_epoch_mean"] = float(np.mean(result.best_epoch[idx]))
        row["epochs_run_mean"] = float(np.mean(result.epochs_run[idx]))
        row["members"] = idx
        rows.append(row)
    return rows


def best_row(rows: list[dict]) -> dict:
    """The combination with the lowest mean validation loss (NaN never wins)."""
    finite = [r for r in rows if math.isfinite(r["val_loss_mean"])]
    if not finite:
        raise ValueError("no combination has a finite validation loss")
    return min(finite, key=lambda r: r["val_loss_mean"])


def _values(name: str, seq, default: float) -> list[float]:
    if seq is None:
        return [default]
    if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence) or not seq:
        raise InputError(f"{name} must be a non-empty sequence of numbers, got {seq!r}")
    out = []
    for v in seq:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputTypeError(f"{name} values must be numbers, got {v!r}")
        out.append(float(v))
    return out


def _seeds(seeds) -> list[int]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise InputError(f"seeds must be a non-empty sequence of ints, got {seeds!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise InputError(f"seeds must be ints >= 0, got {s!r}")
    return list(seeds)


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
