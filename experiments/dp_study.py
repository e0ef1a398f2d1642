"""DP-SGD on digits: test accuracy against epsilon, the noise scale, the speed.

* Privacy against accuracy: a 64-64-10 ReLU network trained with DP-SGD
  (fnnet.train.fit with dp_clip, dp_noise, dp_delta: Poisson batches, each
  example's gradient clipped to norm C, Gaussian noise of standard deviation
  sigma C on the sum, docs/derivation.md eq. 27) at several noise
  multipliers sigma, three seeds each, against the same network and
  optimizer without DP (the non-private baseline) and with clipping but no
  noise. epsilon is dp-accounting's RDP figure at delta = 1e-5 after the
  run's steps (fnnet.privacy).
* The gradient noise scale B_simple = tr(Sigma)/|G|^2 (eq. 28) after every
  epoch of one non-private run (fit(..., log_noise_scale=True)).
* Speed: per-example norms and clipped sums from the batch's rows against a
  batched hand step and against the vmap route, on the benchmark's small and
  medium workloads (experiments/benchmark.py, per_example_section).

Writes dp_study.csv, dp_noise_scale.csv, dp_speed.csv, dp_study.png and
dp_study.md.
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

HIDDEN = (64,)
EPOCHS, BATCH, LR = 30, 64, 0.5  # plain SGD, as in Abadi et al.
CLIP, DELTA = 1.0, 1e-5
# Noise multipliers: "none" is the non-private baseline, 0.0 clipping alone.
SIGMAS = ("none", 0.0, 0.6, 0.9, 1.5, 3.0, 6.0)
SEEDS = (0, 1, 2)
QUICK = dict(epochs=1, sigmas=("none", 1.5), seeds=(0,))


def one_run(sigma, seed, epochs, log_noise_scale=False):
    ds = load_dataset("digits", seed=seed)
    net = MLP((ds.num_features, *HIDDEN, ds.num_outputs), "relu", "softmax",
              "cross_entropy")  # fmt: skip
    dp = {} if sigma == "none" else dict(dp_clip=CLIP, dp_noise=sigma, dp_delta=DELTA)
    config = TrainConfig(
        epochs=epochs,
        batch_size=BATCH,
        learning_rate=LR,
        optimizer="sgd",
        patience=None,
        seed=seed,
        **dp,
    )
    params = net.init(jax.random.key(seed), jnp.float32)
    res = fit(net, params, (ds.x_train, ds.y_train), config=config,
              log_noise_scale=log_noise_scale)  # fmt: skip
    test = evaluate(net, res.state.params, ds.x_test, ds.y_test)
    eps = res.history[-1].get("dp_epsilon", float("inf") if dp else None)
    row = dict(sigma=str(sigma), seed=seed, n_train=len(ds.x_train), epsilon=eps)
    row |= dict(test_accuracy=test["accuracy"], test_loss=test["loss"])
    row |= dict(train_seconds=res.train_seconds)
    return row, res.history


def run(out: Path, quick: bool, progress) -> list[str]:
    q = QUICK if quick else {}
    epochs, sigmas = q.get("epochs", EPOCHS), q.get("sigmas", SIGMAS)
    seeds = q.get("seeds", SEEDS)
    rows, curve = [], []
    for sigma, seed in progress(list(itertools.product(sigmas, seeds)), "dp"):
        log = sigma == "none" and seed == seeds[0]
        row, history = one_run(sigma, seed, epochs, log_noise_scale=log)
        rows.append(row)
        if log:
            keys = ("noise_scale", "noise_trace", "noise_grad_sq", "train_loss")
            curve = [
                {"epoch": h["epoch"], "n_train": row["n_train"]}
                | {k: h[k] for k in keys}
                for h in history
            ]
    speed = speed_rows(quick)
    write_csv(out / "dp_study.csv", rows)
    write_csv(out / "dp_noise_scale.csv", curve)
    write_csv(out / "dp_speed.csv", speed)
    summary = summarize(rows, sigmas)
    plot(out / "dp_study.png", summary, curve)
    return markdown(out / "dp_study.md", summary, curve, speed, epochs, seeds, quick)


def speed_rows(quick: bool) -> list[dict]:
    from experiments import benchmark as bm

    workloads = bm.QUICK_WORKLOADS if quick else bm.WORKLOADS
    names = ("small",) if quick else ("small", "medium")
    rounds = {n: 2 for n in names} if quick else bm.PER_EXAMPLE_ROUNDS
    rows = bm.per_example_section({n: workloads[n] for n in names}, rounds)
    for r in rows:
        lo, hi = r.pop("interval")
        r |= dict(interval_lo=lo, interval_hi=hi)
    return rows


def summarize(rows, sigmas) -> list[dict]:
    out = []
    for sigma in sigmas:
        sel = [r for r in rows if r["sigma"] == str(sigma)]
        acc = np.array([r["test_accuracy"] for r in sel])
        eps = [r["epsilon"] for r in sel]
        out.append(
            dict(
                sigma=str(sigma),
                epsilon=eps[0],  # the same for every seed: same N, B, steps
                accuracy_mean=float(acc.mean()),
                accuracy_std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                seeds=len(sel),
            )
        )
    return out


def label(s) -> str:
    if s["sigma"] == "none":
        return "non-private baseline"
    if s["sigma"] == "0.0":
        return f"clipping only (C = {CLIP:g}), no noise"
    return f"sigma = {s['sigma']}"


def plot(path, summary, curve):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    private = [s for s in summary if s["epsilon"] not in (None, float("inf"))]
    ax.errorbar(
        [s["epsilon"] for s in private],
        [s["accuracy_mean"] for s in private],
        yerr=[s["accuracy_std"] for s in private],
        marker="o",
        capsize=3,
        label="DP-SGD (mean +- std over seeds)",
    )
    for s in private:
        xy = (s["epsilon"], s["accuracy_mean"])
        ax.annotate(f"sigma {s['sigma']}", xy, xytext=(4, -12), fontsize=8,
                    textcoords="offset points")  # fmt: skip
    for s, style in zip(
        [s for s in summary if s not in private], ("--", ":"), strict=False
    ):
        ax.axhline(s["accuracy_mean"], linestyle=style, color="gray", label=label(s))
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon (delta = {DELTA:g}, RDP accountant)")
    ax.set_ylabel("digits test accuracy")
    ax.set_title("privacy against accuracy")
    ax.legend(fontsize=8)
    # Late in training |G|^2 falls below its own estimation noise and its
    # estimate (so B_simple's) can come out negative: shown apart, as |value|.
    pos = [c for c in curve if c["noise_scale"] > 0]
    neg = [c for c in curve if c["noise_scale"] <= 0]
    bx.plot([c["epoch"] for c in pos], [c["noise_scale"] for c in pos], "o-",
            label="B_simple")  # fmt: skip
    if neg:
        what = "|B_simple| of a negative estimate (|G|^2 lost in noise)"
        xs, ys = [c["epoch"] for c in neg], [-c["noise_scale"] for c in neg]
        bx.plot(xs, ys, "rx", label=what)
    if curve:
        bx.axhline(curve[0]["n_train"], color="gray", linestyle=":",
                   label="training set size N")  # fmt: skip
    bx.set_yscale("log")
    bx.legend(fontsize=8)
    bx.set_xlabel("epoch")
    bx.set_ylabel("B_simple = tr(Sigma) / |G|^2")
    bx.set_title("gradient noise scale, non-private run, seed 0")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(path, summary, curve, speed, epochs, seeds, quick) -> list[str]:
    lines = [
        "# DP-SGD on digits",
        "",
        f"64-{HIDDEN[0]}-10 ReLU network, plain SGD (learning rate {LR:g}), "
        f"batch size {BATCH} (DP: Poisson sampling with rate {BATCH}/N), "
        f"{epochs} epochs, clip C = {CLIP:g}, delta = {DELTA:g}; "
        f"seeds {list(seeds)}; test accuracy of the last parameters"
        + (" (QUICK run: not representative)" if quick else "")
        + ".",
        "",
        "| setting | epsilon | test accuracy (mean +- std) |",
        "|---|---|---|",
    ]
    for s in summary:
        eps = s["epsilon"]
        eps = (
            "none" if eps is None else ("inf" if eps == float("inf") else f"{eps:.3g}")
        )
        lines.append(
            f"| {label(s)} | {eps} | {s['accuracy_mean']:.4f} +- "
            f"{s['accuracy_std']:.4f} |"
        )
    if curve:
        first, last = curve[0], curve[-1]
        neg = [c["epoch"] for c in curve if c["noise_scale"] <= 0]
        lines += [
            "",
            f"Gradient noise scale B_simple (non-private run, seed {seeds[0]}, "
            f"N = {first['n_train']} training examples): "
            f"{first['noise_scale']:.3g} after epoch 1, {last['noise_scale']:.3g} "
            f"after epoch {last['epoch']}; negative estimates (|G|^2 below its "
            f"estimation noise) after epochs {neg or 'none'}.",
        ]
    lines += [
        "",
        "Speed, one batch per call (jitted, with an SGD update), median over "
        "interleaved rounds; ratio to the batched hand step (median of per-round "
        "ratios, ~95% interval):",
        "",
        "| workload | batch | kind | ms per step | x hand step |",
        "|---|---|---|---|---|",
    ]
    for r in speed:
        lines.append(
            f"| {r['workload']} {r['sizes']} | {r['batch']} | {r['kind']} | "
            f"{r['ms']:.3g} | {r['vs_hand_step']:.2f} ({r['interval_lo']:.2f}-"
            f"{r['interval_hi']:.2f}) |"
        )
    path.write_text("\n".join(lines) + "\n")
    best = [s for s in summary if s["sigma"] not in ("none", "0.0")]
    head = [
        f"dp: {label(s)}: epsilon {s['epsilon']:.3g}, accuracy {s['accuracy_mean']:.3f}"
        for s in (best[:1] + best[-1:] if len(best) > 1 else best)
    ]
    base = [s for s in summary if s["sigma"] == "none"]
    if base:
        head.append(f"dp: non-private accuracy {base[0]['accuracy_mean']:.3f}")
    return head
