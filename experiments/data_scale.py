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
    python experiments/data_scale.py --device-data     # fit given a device array
    python experiments/data_scale.py --stream 400000   # arrays vs streamed .npy

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


def point(n: int, epochs: int, rounds: int, device_data: bool = False) -> dict:
    """One N, in this process: data MiB, peak RSS MiB, µs per step.

    ``device_data``: hand ``fit`` a device array and drop the NumPy copy
    first (the way to hold the data once on a CPU).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fnnet import MLP, train

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, FEATURES), dtype=np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    data_mib = (x.nbytes + y.nbytes) / 2**20
    if device_data:
        x = jax.block_until_ready(jax.device_put(x))
    net = MLP(sizes=(FEATURES, HIDDEN, CLASSES), output="softmax", loss="cross_entropy")
    params = net.init(jax.random.key(0), jnp.float32)
    config = train.TrainConfig(
        epochs=epochs,
        batch_size=BATCH,
        optimizer="adam",
        learning_rate=1e-3,
        patience=None,
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
        "data_mib": data_mib,
        "peak_mib": peak,
        "us_per_step": 1e6 * statistics.median(times) / steps,
        "finite": bool(ok),
    }


def _write_table(path: Path, n: int, seed: int = 0) -> None:
    """n rows of FEATURES float32 features and a 0/1 label, written in pieces."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (n, FEATURES + 1)
    with open(path, "wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, n, 100_000):
            block = rng.standard_normal((min(100_000, n - start), shape[1]), np.float32)
            block[:, -1] = block[:, 0] + block[:, 1] > 0
            block.tofile(f)


def stream_cost(n: int, chunk_rows: int, rounds: int) -> str:
    """fit on arrays vs fit streaming the same .npy file, side by side here.

    The same rows, network and settings; the arrays are the file's rows
    standardized with the stream's statistics. Epoch time is ``fit``'s
    ``train_seconds`` / epochs (training plus the train-set evaluation),
    median over ``rounds`` alternating runs after a compiling one; "peak
    above start" is VmHWM after ``/proc/self/clear_refs`` reset it (Linux).
    """
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np

    from fnnet import MLP, stream, train

    def kib(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.npy"
        _write_table(path, n)
        start = time.perf_counter()
        data = stream.open_stream(
            path, chunk_rows=chunk_rows, val_fraction=0.0, test_fraction=0.0
        )
        check_s = time.perf_counter() - start
        raw = np.load(path, mmap_mode="r")
        x = ((raw[:, :-1] - data.x_mean) / data.x_std).astype(np.float32)
        y = np.asarray(raw[:, -1]).astype(np.int32)
        del raw
        net = MLP(
            sizes=(FEATURES, HIDDEN, CLASSES), output="softmax", loss="cross_entropy"
        )
        params = net.init(jax.random.key(0), jnp.float32)
        sources = {"arrays": (x, y), "stream": data.source("train")}

        def config(epochs):
            return train.TrainConfig(
                epochs=epochs,
                batch_size=BATCH,
                optimizer="adam",
                learning_rate=1e-3,
                patience=None,
            )

        for src in sources.values():
            train.fit(net, params, src, None, config(1))  # compiles
        seconds = {k: [] for k in sources}
        grew = {k: [] for k in sources}
        for r in range(rounds):
            for k in list(sources)[:: 1 if r % 2 == 0 else -1]:
                before = kib("VmRSS")
                Path("/proc/self/clear_refs").write_text("5")
                result = train.fit(net, params, sources[k], None, config(2))
                grew[k].append((kib("VmHWM") - before) / 1024)
                seconds[k].append(result.train_seconds / 2)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    lines = [
        f"{n:,} rows x {FEATURES} features ({x.nbytes / 2**20:.0f} MiB float32), "
        f"chunk_rows {chunk_rows:,}; checking pass (open_stream) {check_s:.2f} s",
        "",
        "| data | s per epoch (median) | peak RSS above start, MiB (max) |",
        "|---|--:|--:|",
    ]
    for k in sources:
        lines.append(f"| {k} | {med[k]:.2f} | {max(grew[k]):.0f} |")
    lines += [
        "",
        f"- stream / arrays, time per epoch: {med['stream'] / med['arrays']:.2f}",
    ]
    return "\n".join(lines) + "\n"


def run(rows: list[int], epochs: int, rounds: int, device_data=False) -> list[dict]:
    """Every N (and the baseline) in its own process; one record each."""
    out = []
    flag = ["--device-data"] if device_data else []
    for n in [BASELINE_ROWS, *rows]:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--epochs", str(epochs),
             "--rounds", str(rounds), *flag],
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
    parser.add_argument(
        "--device-data",
        action="store_true",
        help="give fit a device array and drop the NumPy copy (data held once)",
    )
    parser.add_argument(
        "--stream",
        type=int,
        default=None,
        metavar="N",
        help="instead: fit on N rows as arrays vs streamed from a .npy file",
    )
    parser.add_argument(
        "--chunk-rows", type=int, default=65536, help="chunk rows for --stream"
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        rec = point(args.child, args.epochs, args.rounds, args.device_data)
        print(json.dumps(rec))
        return 0
    if args.stream is not None:
        print(f"== streaming cost: {args.stream:,} rows")
        print(stream_cost(args.stream, args.chunk_rows, args.rounds))
        return 0
    rows = [int(r) for r in args.rows.split(",")]
    print(f"== data scale: N = {', '.join(f'{n:,}' for n in rows)}")
    records = run(rows, args.epochs, args.rounds, args.device_data)
    text = report(records, args.epochs, args.rounds)
    if args.device_data:
        text = "Data handed to fit as a device array (NumPy copy dropped).\n\n" + text
    print(text)
    import jax

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"data_scale_{jax.devices()[0].platform}.md"
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
