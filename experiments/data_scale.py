"""Data scale: peak memory and step time of ``fnnet.train.fit`` as N grows.

The workload of issue "data at scale": a 100-64-2 ReLU network, softmax and
cross-entropy, Adam, batch 256, float32, N synthetic rows of 100 features.
Each N runs in a FRESH process (peak RSS is a per-process high-water mark):

* peak RSS (``VmHWM``, else ``ru_maxrss``) over data generation and a
  ``fit`` of ``--epochs`` epochs (training plus the per-epoch evaluations);
* a runtime baseline: the same run on 1,024 rows, so ``peak - baseline`` is
  what the data costs;
* steady time per step: the compiled epoch (``run_epoch_jit``) on the
  prepared arrays, median over ``--rounds`` epochs after ``fit`` warmed it.

The processes run one after the other, so the step-time ratio between the
largest and the smallest N (the target: within 10%) carries the machine's
drift between them; rerun on a busy machine.

Run from the repository root (also ``python experiments/benchmark.py
--data-scale``):

    python experiments/data_scale.py                        # 50k and 500k rows
    python experiments/data_scale.py --rows 100000,1000000,4000000

Prints a table and writes ``data_scale_<platform>.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_ROWS = (50_000, 500_000)
BASELINE_ROWS = 1024
FEATURES, HIDDEN, CLASSES, BATCH = 100, 64, 2, 256
EPOCHS, ROUNDS = 2, 3
PEAK_MAX = 2.2  # peak RSS / data: the data plus 1.2x the data
STEP_RATIO_MAX = 1.10


def _peak_mib() -> float:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak / 1024 if sys.platform == "darwin" else peak


def point(n: int, epochs: int, rounds: int) -> dict:
    """One N, in this process: data MiB, peak RSS MiB, µs per step."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fnnet import MLP, train

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, FEATURES), dtype=np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    net = MLP(sizes=(FEATURES, HIDDEN, CLASSES), output="softmax", loss="cross_entropy")
    params = net.init(jax.random.key(0), jnp.float32)
    config = train.TrainConfig(
        epochs=epochs, batch_size=BATCH, optimizer="adam", learning_rate=1e-3
    )
    result = train.fit(net, params, (x, y), None, config)
    peak = _peak_mib()

    if hasattr(train, "to_device"):
        X, Y = train.to_device(net, params, x, y)
    else:  # an fnnet from before it (PYTHONPATH=<older checkout>), to compare
        from fnnet import core

        X, Y = core.prepare(net, params, x, y)
    opt = train.make_optimizer(config)
    state = result.state  # donated to the timed epochs; fit is done with it
    steps, times = n // BATCH, []
    for r in range(rounds + 1):
        key = train.epoch_key(jax.random.key(1), r + 1)
        start = time.perf_counter()
        state, losses, ok = train.run_epoch_jit(
            net, config.step_part(), opt, state, X, Y, key
        )
        jax.block_until_ready(losses)
        if r:  # the first round settles caches
            times.append(time.perf_counter() - start)
    return {
        "rows": n,
        "data_mib": (x.nbytes + y.nbytes) / 2**20,
        "peak_mib": peak,
        "us_per_step": 1e6 * statistics.median(times) / steps,
        "finite": bool(ok),
    }


def run(rows: list[int], epochs: int, rounds: int) -> list[dict]:
    """Every N (and the baseline) in its own process; one record each."""
    out = []
    for n in [BASELINE_ROWS, *rows]:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--epochs", str(epochs),
             "--rounds", str(rounds)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"N={n} failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = out[-1]
        print(
            f"   N={n:>9,}: data {r['data_mib']:8.1f} MiB, peak RSS "
            f"{r['peak_mib']:8.1f} MiB, {r['us_per_step']:7.1f} µs/step",
            flush=True,
        )
    return out


def report(records: list[dict], epochs: int, rounds: int) -> str:
    base, points = records[0], records[1:]
    lines = [
        f"fit of {epochs} epochs, {FEATURES}-{HIDDEN}-{CLASSES} ReLU, Adam, batch "
        f"{BATCH}, float32; each N in a fresh process; runtime baseline "
        f"(N={BASELINE_ROWS:,}) peak RSS {base['peak_mib']:.0f} MiB.",
        "",
        "| N | data MiB | peak RSS MiB | peak / data | (peak - baseline) / data "
        "| µs per step | x smallest N |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    first = points[0]["us_per_step"]
    for r in points:
        above = (r["peak_mib"] - base["peak_mib"]) / r["data_mib"]
        lines.append(
            f"| {r['rows']:,} | {r['data_mib']:.1f} | {r['peak_mib']:.0f} | "
            f"{r['peak_mib'] / r['data_mib']:.2f} | {above:.2f} | "
            f"{r['us_per_step']:.1f} | {r['us_per_step'] / first:.3f} |"
        )
    last = points[-1]
    ratio = last["us_per_step"] / first
    verdict = "met" if ratio <= STEP_RATIO_MAX else "MISSED"
    lines += [
        "",
        f"- step time at N={last['rows']:,} / N={points[0]['rows']:,}: {ratio:.3f} "
        f"(target <= {STEP_RATIO_MAX}): {verdict}",
        f"- peak RSS / data at N={last['rows']:,}: "
        f"{last['peak_mib'] / last['data_mib']:.2f} (target <= {PEAK_MAX}, "
        "runtime included): "
        f"{'met' if last['peak_mib'] <= PEAK_MAX * last['data_mib'] else 'MISSED'}",
        f"- {rounds} timed epochs per N (median), after {epochs} epochs of fit.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        default=",".join(map(str, DEFAULT_ROWS)),
        help="comma-separated N, smallest first (the issue's: 100000,1000000,4000000)",
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs of fit")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="timed epochs")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="results folder")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(point(args.child, args.epochs, args.rounds)))
        return 0
    rows = [int(r) for r in args.rows.split(",")]
    print(f"== data scale: N = {', '.join(f'{n:,}' for n in rows)}")
    records = run(rows, args.epochs, args.rounds)
    text = report(records, args.epochs, args.rounds)
    print(text)
    import jax

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"data_scale_{jax.devices()[0].platform}.md"
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
