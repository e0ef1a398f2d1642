"""Regularization: overfitting, and what L2, dropout and early stopping do to it.

A network large enough to overfit (two hidden layers of 512 ReLU units) is
trained with Adam on a small subset of the training split of digits and
breast_cancer, four ways: no regularization, L2 (J + alpha/2 ||W||^2,
docs/derivation.md eq. 17), dropout (keep probability p, eq. 20) and early
stopping (patience on the validation loss, docs/derivation.md#training). The
first three are evaluated with their LAST parameters (fnnet.train.fit returns
the best-validation parameters whenever a validation set is given, which is
itself early stopping, so this study takes ``result.state.params``); early
stopping uses the best-validation parameters. Test metrics over several seeds
(seed drives the split, subset, init, shuffling and dropout).

Writes regularization.csv (one row per data set, variant, seed),
regularization_curves.csv (seed 0's learning curves), regularization.png and
regularization.md.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.report import write_csv
from fnnet.data import load_dataset
from fnnet.network import MLP
from fnnet.train import TrainConfig, evaluate, fit

DATASETS = {"digits": 300, "breast_cancer": 100}  # name: training examples kept
HIDDEN = (512, 512)
EPOCHS, BATCH, LR = 150, 32, 1e-3
L2_ALPHA = 1e-3
KEEP_PROB = 0.5
PATIENCE = 10
SEEDS = (0, 1, 2, 3, 4)
VARIANTS = ("none", "l2", "dropout", "early_stopping")
QUICK = dict(datasets={"digits": 200}, hidden=(64,), epochs=5, seeds=(0, 1))
TINY = dict(datasets={"digits": 120}, hidden=(8,), epochs=3)  # the tests' smoke run


def one_run(name, n_train, variant, seed, hidden, epochs):
    ds = load_dataset(name, seed=seed)
    keep = np.random.default_rng(seed).permutation(len(ds.x_train))[:n_train]
    train = (ds.x_train[keep], ds.y_train[keep])
    net = MLP(
        (ds.num_features, *hidden, ds.num_outputs),
        "relu",
        "softmax",
        "cross_entropy",
        keep_prob=KEEP_PROB if variant == "dropout" else 1.0,
    )
    config = TrainConfig(
        epochs=epochs,
        batch_size=BATCH,
        learning_rate=LR,
        optimizer="adam",
        l2=L2_ALPHA if variant == "l2" else 0.0,
        patience=PATIENCE if variant == "early_stopping" else None,
        seed=seed,
    )
    params = net.init(jax.random.key(seed), jnp.float32)
    res = fit(net, params, train, (ds.x_val, ds.y_val), config)
    final = res.params if variant == "early_stopping" else res.state.params
    test = evaluate(net, final, ds.x_test, ds.y_test)
    tr = evaluate(net, final, *train)
    va = evaluate(net, final, ds.x_val, ds.y_val)
    row = dict(dataset=name, variant=variant, seed=seed, n_train=n_train)
    row |= dict(epochs_run=res.epochs_run, best_epoch=res.best_epoch)
    row |= dict(train_loss=tr["loss"], val_loss=va["loss"], test_loss=test["loss"])
    row |= dict(
        train_accuracy=tr["accuracy"],
        val_accuracy=va["accuracy"],
        test_accuracy=test["accuracy"],
    )
    return row, res.history


def run(out: Path, quick: bool, progress) -> list[str]:
    q = QUICK if quick else {}
    datasets = q.get("datasets", DATASETS)
    hidden, epochs = q.get("hidden", HIDDEN), q.get("epochs", EPOCHS)
    seeds = q.get("seeds", SEEDS)
    rows, curves = [], []
    cases = list(itertools.product(datasets, seeds, VARIANTS))
    for name, seed, variant in progress(cases, "regularization"):
        row, history = one_run(name, datasets[name], variant, seed, hidden, epochs)
        rows.append(row)
        if seed == seeds[0]:
            curves += [
                dict(dataset=name, variant=variant, epoch=h["epoch"])
                | dict(train_loss=h["train_loss"], val_loss=h["val_loss"])
                for h in history
            ]
    write_csv(out / "regularization.csv", rows)
    write_csv(out / "regularization_curves.csv", curves)
    plot(out / "regularization.png", curves, datasets, rows)
    return markdown(
        out / "regularization.md", rows, curves, datasets, hidden, epochs, quick
    )


LABELS = {
    "none": "no regularization",
    "l2": f"L2, alpha = {L2_ALPHA:g}",
    "dropout": f"dropout, keep_prob = {KEEP_PROB:g}",
    "early_stopping": f"early stopping, patience {PATIENCE}",
}


def plot(path, curves, datasets, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(datasets),
        len(VARIANTS),
        figsize=(14, 3.4 * len(datasets) + 0.6),
        squeeze=False,
        sharey="row",
    )
    seed0 = min(r["seed"] for r in rows)
    for (i, name), (j, v) in itertools.product(
        enumerate(datasets), enumerate(VARIANTS)
    ):
        ax = axes[i, j]
        sel = [c for c in curves if c["dataset"] == name and c["variant"] == v]
        ep = [c["epoch"] for c in sel]
        ax.semilogy(ep, [c["train_loss"] for c in sel], label="train")
        ax.semilogy(ep, [c["val_loss"] for c in sel], label="validation")
        if v == "early_stopping":
            best = next(
                r["best_epoch"]
                for r in rows
                if r["dataset"] == name and r["variant"] == v and r["seed"] == seed0
            )
            ax.axvline(best, color="gray", ls=":", label=f"best epoch {best}")
        ax.set_title(f"{name}: {LABELS[v]}", fontsize=9)
        ax.set_xlabel("epoch")
        if j == 0:
            ax.set_ylabel("cost J (mean cross-entropy, nats, log)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Learning curves, seed {seed0} (train loss without the L2 penalty or "
        "dropout: evaluation mode)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ms(xs, digits=3):
    sd = np.std(xs, ddof=1 if len(xs) > 1 else 0)
    return f"{np.mean(xs):.{digits}f} ± {sd:.{digits}f}"


def markdown(path, rows, curves, datasets, hidden, epochs, quick):
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# Regularization: overfitting, L2, dropout, early stopping",
        "",
        "Generated by `python -m experiments --only regularization`"
        + (" (QUICK run: small net, few epochs)" if quick else "")
        + "; do not edit.",
        "",
        f"Network: {' x '.join(map(str, hidden))} ReLU hidden units, softmax + "
        f"cross-entropy, Adam lr {LR:g}, batch {BATCH}, {epochs} epochs, trained on "
        + ", ".join(f"{n} training examples of {k}" for k, n in datasets.items())
        + " (a random subset of the seed's training split; validation and test "
        "splits are the CLI's: 15% and 20%). Variants: "
        + "; ".join(LABELS[v] for v in VARIANTS)
        + ". The first three are scored with the parameters of the last epoch, "
        "early stopping with those of its best validation epoch. Mean ± std (sample "
        f"std) over seeds {seeds}. Gap = validation loss - training loss at the "
        "parameters scored.",
        "",
        "| data set | variant | test accuracy | test loss | train loss | val loss "
        "| gap val - train | epochs run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    heads = []
    for name, v in itertools.product(datasets, VARIANTS):
        sel = [r for r in rows if r["dataset"] == name and r["variant"] == v]
        get = lambda k, sel=sel: [r[k] for r in sel]  # noqa: E731
        gap = [r["val_loss"] - r["train_loss"] for r in sel]
        lines.append(
            f"| {name} | {LABELS[v]} | {ms(get('test_accuracy'))} | "
            f"{ms(get('test_loss'))} | {ms(get('train_loss'), 4)} | "
            f"{ms(get('val_loss'))} | {ms(gap)} | {ms(get('epochs_run'), 0)} |"
        )
        heads.append((name, v, np.mean(get("test_accuracy")), np.mean(gap)))
    lines += ["", "## What happened", ""]
    for name in datasets:
        h = {v: (acc, gap) for n, v, acc, gap in heads if n == name}
        base_acc, base_gap = h["none"]
        parts = [
            f"without regularization the last-epoch gap is {base_gap:.3f} nats "
            f"(test accuracy {base_acc:.3f})"
        ]
        for v in VARIANTS[1:]:
            acc, gap = h[v]
            parts.append(f"{LABELS[v]}: gap {gap:.3f}, test accuracy {acc:.3f}")
        sel = [r for r in rows if r["dataset"] == name]
        loss = {
            v: np.mean([r["test_loss"] for r in sel if r["variant"] == v])
            for v in VARIANTS
        }
        best = min(loss, key=loss.get)
        spread = max(h[v][0] for v in VARIANTS) - min(h[v][0] for v in VARIANTS)
        parts.append(
            f"lowest mean test loss: {LABELS[best]} ({loss[best]:.3f}, against "
            f"{loss['none']:.3f} without regularization); the test accuracies of the "
            f"four variants lie within {spread:.3f} "
            "of each other"
        )
        lines.append(f"- **{name}**: " + "; ".join(parts) + ".")
    for name, v in itertools.product(datasets, ("none", "l2", "dropout")):
        sel = [c for c in curves if c["dataset"] == name and c["variant"] == v]
        i = int(np.argmin([c["val_loss"] for c in sel]))
        lines.append(
            f"- seed {seeds[0]}, {name}, {LABELS[v]}: validation loss is lowest at "
            f"epoch {sel[i]['epoch']} ({sel[i]['val_loss']:.3f}) and "
            f"{sel[-1]['val_loss']:.3f} at epoch {sel[-1]['epoch']}, while the "
            f"training loss goes from {sel[i]['train_loss']:.2e} to "
            f"{sel[-1]['train_loss']:.2e}."
        )
    lines += [
        "",
        "The curves of `regularization.png` (seed "
        f"{seeds[0]}) plot these runs (train vs validation loss per epoch); early "
        f"stopping halts {PATIENCE} epochs after the validation minimum. Raw numbers: "
        "`regularization.csv`, curves: `regularization_curves.csv`.",
        "",
    ]
    Path(path).write_text("\n".join(lines))
    out = []
    for name in datasets:
        h = {v: (acc, gap) for n, v, acc, gap in heads if n == name}
        out.append(
            f"regularization {name}: test acc / gap "
            + ", ".join(f"{v} {h[v][0]:.3f}/{h[v][1]:.2f}" for v in VARIANTS)
        )
    return out
