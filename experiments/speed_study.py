"""Speed: hand-written backprop vs jax.grad vs per-example gradients.

Times one training step over network sizes and batch sizes with the benchmark
harness of experiments/benchmark.py (``step_times``: median seconds per step,
interleaved rounds, float32, relu, softmax + cross-entropy, plain SGD). Runs on
whatever device JAX picks, so the same script on a GPU machine writes a second,
labelled set of files: speed_<platform>.csv, speed_<platform>.png and
speed_<platform>.md (platform = jax.devices()[0].platform: cpu, gpu, ...).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import jax
import numpy as np

from experiments.report import write_csv

SIZES = ((64, 64, 10), (256, 256, 10), (784, 512, 512, 10), (784, 1024, 1024, 10))
BATCHES = (32, 128, 512)
REPEATS = 10  # the largest per-example case takes ~2 s a call on 2 CPU cores
QUICK = dict(sizes=((64, 64, 10),), batches=(32, 128), repeats=3)
TINY = dict(sizes=((16, 16, 4),), batches=(8,), repeats=1)  # the tests' smoke run
KINDS = ("hand", "auto", "per_example_hand", "per_example_auto")


def device():
    d = jax.devices()[0]
    return d.platform, getattr(d, "device_kind", str(d))


def run(out: Path, quick: bool, progress) -> list[str]:
    """Time every (size, batch); write the CSV, figure and write-up; headlines."""
    try:
        from experiments.benchmark import step_times
    except ImportError as err:
        msg = (
            "speed: SKIPPED, experiments.benchmark.step_times is not available "
            f"({err}); the speed study needs the benchmark harness"
        )
        print(msg, file=sys.stderr)
        return [msg]
    q = QUICK if quick else {}
    sizes, batches = q.get("sizes", SIZES), q.get("batches", BATCHES)
    repeats = q.get("repeats", REPEATS)
    platform, kind = device()
    rows = []
    for s, b in progress(list(itertools.product(sizes, batches)), "speed"):
        t = step_times(s, b, repeats=repeats)
        row = dict(platform=platform, device_kind=kind, sizes="-".join(map(str, s)))
        row |= dict(batch=b, repeats=repeats)
        row |= {f"{k}_ms": 1e3 * t[k] for k in KINDS}
        row["hand_over_auto"] = t["hand"] / t["auto"]
        row["per_example_hand_over_auto"] = (
            t["per_example_hand"] / t["per_example_auto"]
        )
        rows.append(row)
    stem = out / f"speed_{platform}"
    write_csv(f"{stem}.csv", rows, digits=5)
    plot(f"{stem}.png", rows, sizes, platform, kind)
    return markdown(f"{stem}.md", rows, platform, kind, quick)


def plot(path, rows, sizes, platform, kind):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter, NullLocator

    styles = dict(
        hand=("C0", "o-"),
        auto=("C1", "s--"),
        per_example_hand=("C2", "^-"),
        per_example_auto=("C3", "v--"),
    )
    n = len(sizes)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 1, 7), squeeze=False)
    for j, s in enumerate(sizes):
        name = "-".join(map(str, s))
        sel = [r for r in rows if r["sizes"] == name]
        bs = [r["batch"] for r in sel]
        ax = axes[0, j]
        for k, (c, ls) in styles.items():
            ax.loglog(bs, [r[f"{k}_ms"] for r in sel], ls, color=c, label=k)
        ax.set_title(f"sizes {name}", fontsize=10)
        ax.set_xlabel("batch size (examples, log scale)")
        ax.set_ylabel("time per step (ms, log scale)")
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.grid(True, alpha=0.3)
        ax = axes[1, j]
        ax.semilogx(bs, [r["hand_over_auto"] for r in sel], "o-", label="hand / auto")
        ax.semilogx(
            bs,
            [r["per_example_hand_over_auto"] for r in sel],
            "^--",
            label="per-example hand / auto",
        )
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.set_xlabel("batch size (examples, log scale)")
        ax.set_ylabel("time ratio hand / jax.grad (dimensionless)")
        ax.grid(True, alpha=0.3)
    for ax in axes.ravel():  # plain numbers, no crowded minor labels on log axes
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        lo, hi = ax.get_ylim()
        many = ax.get_yscale() == "log" and hi / lo > 10  # major labels suffice
        ax.yaxis.set_minor_formatter(
            NullFormatter() if many else FormatStrFormatter("%.3g")
        )
        ax.tick_params(axis="y", which="minor", labelsize=7)
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    fig.suptitle(f"Training-step time, {platform} ({kind}); ratio < 1: hand faster")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdict(m):
    if 0.9 <= m <= 1.1:
        return "Within 10%: the hand pass costs about what jax.grad costs."
    faster = "hand-written pass" if m < 0.9 else "jax.grad"
    return f"The {faster} is faster in the median case by {abs(1 - m):.0%}."


def markdown(path, rows, platform, kind, quick):
    ratios = [r["hand_over_auto"] for r in rows]
    pe = [r["per_example_hand_over_auto"] for r in rows]
    pe_cost = [r["per_example_hand_ms"] / r["hand_ms"] for r in rows]
    hi = max(rows, key=lambda r: r["hand_over_auto"])
    lo = min(rows, key=lambda r: r["hand_over_auto"])
    lines = [
        f"# Speed: hand vs jax.grad vs per-example ({platform}: {kind})",
        "",
        "Generated by `python -m experiments --only speed`"
        + (" (QUICK run)" if quick else "")
        + "; do not edit. Median time per training step from "
        "`experiments.benchmark.step_times` (float32, relu hidden layers, softmax "
        "+ cross-entropy, plain SGD; per-example: vmap of the single-example "
        f"gradient over the batch), {rows[0]['repeats']} interleaved rounds.",
        "",
        f"**Headline**: hand / jax.grad step-time ratio median {np.median(ratios):.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}); per-example hand / auto "
        f"median {np.median(pe):.2f} (range {min(pe):.2f}-{max(pe):.2f}). "
        + verdict(float(np.median(ratios)))
        + f" The largest ratio, {hi['hand_over_auto']:.2f}, is at sizes {hi['sizes']}, "
        f"batch {hi['batch']}; the smallest, {lo['hand_over_auto']:.2f}, at sizes "
        f"{lo['sizes']}, batch {lo['batch']}. Per-example gradients (one gradient "
        "per example, materialised) cost a median "
        f"{np.median(pe_cost):.1f}x a hand batch step (range {min(pe_cost):.1f}-"
        f"{max(pe_cost):.1f}x).",
        "",
        "| sizes | batch | hand (ms) | auto (ms) | per-example hand (ms) | "
        "per-example auto (ms) | hand/auto | per-ex. hand/auto |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sizes']} | {r['batch']} | {r['hand_ms']:.3f} | {r['auto_ms']:.3f} "
            f"| {r['per_example_hand_ms']:.3f} | {r['per_example_auto_ms']:.3f} | "
            f"{r['hand_over_auto']:.2f} | {r['per_example_hand_over_auto']:.2f} |"
        )
    lines += ["", f"Figure: `{Path(path).stem}.png`.", ""]
    Path(path).write_text("\n".join(lines))
    return [
        f"speed ({platform}): hand/auto median {np.median(ratios):.2f} "
        f"[{min(ratios):.2f}, {max(ratios):.2f}], per-example hand/auto median "
        f"{np.median(pe):.2f}"
    ]
