"""Data scale: peak memory and step time of ``fnnet.train.fit`` as N grows.

The workload of issue "data at scale": a 100-64-2 ReLU network, softmax and
cross-entropy, Adam, batch 256, float32, N synthetic rows of 100 features.

* Peak RSS: each N runs ``fit`` for ``--epochs`` epochs in a FRESH process
  (peak RSS, ``VmHWM``, is a per-process high-water mark), twice: once on
  plain NumPy arrays (the CPU backend copies them to the device, so the data
  is held twice) and once on arrays from :mod:`fnnet.hostarray` (aligned, so
  the CPU device array shares the host memory). A 1,024-row run gives the
  runtime's own footprint (baseline).
* Time per step: ONE process holds every N's data and runs the compiled
  epoch (``run_epoch_jit``) on each N in turn, ``--rounds`` times round
  robin after a warm-up epoch each; the median epoch time / steps per epoch.
  The ratio between the largest and smallest N (target: within 10%) is thus
  measured side by side, not across processes started minutes apart.

Run from the repository root (also ``python experiments/benchmark.py
--data-scale``):

    python experiments/data_scale.py                        # 50k and 500k rows
    python experiments/data_scale.py --rows 100000,1000000,4000000
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
EPOCHS, ROUNDS = 1, 5
PEAK_MAX = 2.2  # peak RSS / data: the data plus 1.2x the data
STEP_RATIO_MAX = 1.10
HOSTS = ("numpy", "aligned")


def _peak_mib() -> float:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak / 1024 if sys.platform == "darwin" else peak


def synthetic(n: int, host: str = "aligned", seed: int = 0):
    """n rows: x standard normal float32 (n, FEATURES), y = [x0 + x1 > 0].

    ``host``: "numpy" (NumPy's own allocation) or "aligned"
    (:func:`fnnet.hostarray.empty`, filled in place); the values are the same.
    """
    import numpy as np

    from fnnet import hostarray

    rng = np.random.default_rng(seed)
    if host == "numpy":
        x = rng.standard_normal((n, FEATURES), dtype=np.float32)
    else:
        x = hostarray.empty((n, FEATURES), np.float32)
        rng.standard_normal(dtype=np.float32, out=x)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    return x, y


def _setup():
    import jax
    import jax.numpy as jnp

    from fnnet import MLP, train

    net = MLP(sizes=(FEATURES, HIDDEN, CLASSES), output="softmax", loss="cross_entropy")
    params = net.init(jax.random.key(0), jnp.float32)
    config = train.TrainConfig(
        batch_size=BATCH, optimizer="adam", learning_rate=1e-3, patience=None
    )
    return net, params, config


def point(n: int, epochs: int, host: str) -> dict:
    """One N, in this process: data MiB and peak RSS MiB over ``fit``."""
    import dataclasses

    from fnnet import train

    x, y = synthetic(n, host)
    data_mib = (x.nbytes + y.nbytes) / 2**20
    net, params, config = _setup()
    config = dataclasses.replace(config, epochs=epochs)
    result = train.fit(net, params, (x, y), None, config)
    return {
        "rows": n,
        "host": host,
        "data_mib": data_mib,
        "peak_mib": _peak_mib(),
        "finite": all(map(_finite, result.history)),
    }


def _finite(record: dict) -> bool:
    return all(v == v and abs(v) != float("inf") for v in record.values())


def step_times(rows: list[int], rounds: int) -> tuple[dict[int, float], float]:
    """µs per step of the compiled epoch for every N, interleaved in one process.

    Each round times every N in turn over the same number of rows (the
    largest N's; ``max(rows) // N`` epochs of a smaller N), so each N is
    timed over a window of similar length and drift between rounds cancels
    in the per-round ratios. Returns ``({N: median µs per step}, median over
    rounds of (µs per step at the largest N) / (at the smallest N))``.
    """
    import jax
    import jax.numpy as jnp

    from fnnet import train

    net, params, config = _setup()
    opt = train.make_optimizer(config)
    step = config.step_part()
    data = {n: train.to_device(net, params, *synthetic(n)) for n in rows}
    # Each state is donated to its epochs, so each N gets its own copy.
    states = {n: train.init_state(jax.tree.map(jnp.copy, params), opt) for n in rows}
    us: dict[int, list[float]] = {n: [] for n in rows}
    base, epoch = jax.random.key(1), 0
    for r in range(rounds + 1):
        for n in rows:
            reps = 1 if r == 0 else max(1, max(rows) // n)  # round 0 compiles
            start = time.perf_counter()
            for _ in range(reps):
                epoch += 1
                states[n], losses, _ = train.run_epoch_jit(
                    net, step, opt, states[n], *data[n], train.epoch_key(base, epoch)
                )
            jax.block_until_ready(losses)
            if r:
                us[n].append(
                    1e6 * (time.perf_counter() - start) / (reps * (n // BATCH))
                )
    ratio = statistics.median(
        a / b for a, b in zip(us[max(rows)], us[min(rows)], strict=True)
    )
    return {n: statistics.median(v) for n, v in us.items()}, ratio


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


def peaks(rows: list[int], epochs: int) -> list[dict]:
    """Every N (and the baseline), each host kind, in its own process."""
    out = []
    for n in [BASELINE_ROWS, *rows]:
        for host in HOSTS:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(n), "--epochs", str(epochs),
                 "--host", host],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"N={n} ({host}) failed:\n{proc.stderr[-3000:]}")
            out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = out[-1]
            print(
                f"   N={n:>9,} {host:>7}: data {r['data_mib']:8.1f} MiB, "
                f"peak RSS {r['peak_mib']:8.1f} MiB",
                flush=True,
            )
    return out


def report(records, us: dict[int, float], ratio: float, epochs: int, rounds: int):
    peak = {(r["rows"], r["host"]): r["peak_mib"] for r in records}
    data = {r["rows"]: r["data_mib"] for r in records}
    rows = sorted(us)
    base = {h: peak[BASELINE_ROWS, h] for h in HOSTS}
    lines = [
        f"fit of {epochs} epoch(s), {FEATURES}-{HIDDEN}-{CLASSES} ReLU, Adam, batch "
        f"{BATCH}, float32. Peak RSS: each N and host kind in a fresh process; "
        f"runtime baseline (N={BASELINE_ROWS:,}) {base['numpy']:.0f} / "
        f"{base['aligned']:.0f} MiB. Time per step: every N in one process, "
        f"{rounds} rounds, each timing every N over {rows[-1]:,} rows (median); "
        "the ratio is the median of the per-round ratios.",
        "",
        "| N | data MiB | peak RSS, NumPy arrays | / data | peak RSS, aligned "
        "arrays | / data | µs per step | x smallest N |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for n in rows:
        d = data[n]
        lines.append(
            f"| {n:,} | {d:.1f} | {peak[n, 'numpy']:.0f} | "
            f"{peak[n, 'numpy'] / d:.2f} | {peak[n, 'aligned']:.0f} | "
            f"{peak[n, 'aligned'] / d:.2f} | {us[n]:.1f} | {us[n] / us[rows[0]]:.3f} |"
        )
    last = rows[-1]

    def verdict(ok):
        return "met" if ok else "MISSED"

    lines += [
        "",
        f"- step time at N={last:,} / N={rows[0]:,} (median per-round ratio): "
        f"{ratio:.3f} (target <= "
        f"{STEP_RATIO_MAX}): {verdict(ratio <= STEP_RATIO_MAX)}",
    ]
    for host, what in (
        ("aligned", "aligned arrays (fnnet.hostarray, shared by the CPU device)"),
        ("numpy", "NumPy arrays (copied to the device)"),
    ):
        p = peak[last, host] / data[last]
        lines.append(
            f"- peak RSS / data at N={last:,}, {what}: {p:.2f} (target <= "
            f"{PEAK_MAX}, runtime included): {verdict(p <= PEAK_MAX)}"
        )
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
    parser.add_argument("--host", choices=HOSTS, help=argparse.SUPPRESS)
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
        print(json.dumps(point(args.child, args.epochs, args.host)))
        return 0
    if args.stream is not None:
        print(f"== streaming cost: {args.stream:,} rows")
        print(stream_cost(args.stream, args.chunk_rows, args.rounds))
        return 0
    rows = [int(r) for r in args.rows.split(",")]
    print(f"== data scale: N = {', '.join(f'{n:,}' for n in rows)}")
    records = peaks(rows, args.epochs)
    us, ratio = step_times(rows, args.rounds)
    for n in rows:
        print(f"   N={n:>9,}: {us[n]:7.1f} µs/step")
    text = report(records, us, ratio, args.epochs, args.rounds)
    print(text)
    import jax

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"data_scale_{jax.devices()[0].platform}.md"
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
