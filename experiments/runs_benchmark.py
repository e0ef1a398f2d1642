"""Whole runs: ``fnnet train``'s per-epoch overhead, and sweeps against runs one by one.

Two measurements, each side by side in one process (interleaved rounds,
medians of per-round ratios, because the machine is shared):

* **overhead**: the per-epoch wall time of ``fnnet train`` with its defaults
  on digits (64-128-10 ReLU, Adam 1e-3, batch 32, validation and
  checkpoints on; ``--patience`` set to the epoch count so every run has the
  same number of epochs) against the compiled epoch alone
  (``fnnet.train.run_epoch_jit`` in a loop). The per-epoch time of
  ``fnnet train`` is the marginal one, ``(wall(E2) - wall(E1)) / (E2 - E1)``
  of two whole in-process ``fnnet train`` commands (start-up, data loading,
  compilation, test evaluation and plots are the same in both and cancel);
  the ratio of its ``train_seconds / epochs`` is printed too.
* **sweep**: ``fnnet.sweep.fit_sweep`` of lr x seeds (digits defaults,
  fixed epochs) against the same runs with ``fnnet.train.fit`` one after
  another in one process, and against separate ``fnnet train`` processes
  (one per run, as a shell loop would start them). In-process figures are
  given cold (compilation included, caches cleared first) and warm.

Run ``python experiments/benchmark.py --runs`` (or this file directly).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

from fnnet import cli, core, train
from fnnet import data as fdata
from fnnet import sweep as fsweep
from fnnet.network import MLP

FULL = {
    "epochs": (20, 300),
    "rounds": 5,
    "lrs": (1e-3, 3e-3, 1e-2),
    "seeds": (0, 1),
    "sweep_epochs": 20,
    "sweep_rounds": 2,
}
QUICK = {
    "epochs": (3, 8),
    "rounds": 1,
    "lrs": (1e-3, 1e-2),
    "seeds": (0,),
    "sweep_epochs": 3,
    "sweep_rounds": 1,
}
OVERHEAD_MAX = 1.5  # issue 13: fnnet train's epoch / the compiled epoch


def _defaults():
    """The network, config and data of ``fnnet train``'s defaults on digits."""
    ds = fdata.load_dataset("digits", seed=0)
    net = MLP((64, 128, 10), activation="relu", output="softmax", loss="cross_entropy")
    config = train.TrainConfig(
        batch_size=32, learning_rate=1e-3, optimizer="adam", patience=20
    )
    return ds, net, config


def _compiled_epochs(net, config, ds, epochs: int):
    params = net.init(jax.random.key(0))
    optimizer = train.make_optimizer(config)
    X, Y = core.prepare(net, params, ds.x_train, ds.y_train)
    base = jax.random.key(0)
    step_config = config.step_part()

    def run():
        state = train.init_state(jax.tree.map(lambda t: t.copy(), params), optimizer)
        for epoch in range(1, epochs + 1):
            key = train.epoch_key(base, epoch)
            state, _, _ = train.run_epoch_jit(
                net, step_config, optimizer, state, X, Y, key
            )
        jax.block_until_ready(state)

    return run


def _cli_train(epochs: int, folder: Path, main=cli.main, tag=""):
    count = iter(range(10**6))

    def run():
        out = folder / f"{tag}e{epochs}-{next(count)}"
        argv = ["train", "--quiet", "--out", str(out), "--epochs", str(epochs)]
        with contextlib.redirect_stdout(io.StringIO()):
            code = main([*argv, "--patience", str(epochs)])
        if code != 0:
            raise RuntimeError(f"fnnet train {argv} exited {code}")
        return json.loads((out / "metrics.json").read_text())["train_seconds"]

    return run


def overhead(sizes: dict, before=None) -> dict:
    """The per-epoch overhead of ``fnnet train`` (see the module docstring).

    ``before``: optional ``fnnet`` package of another revision (see
    ``benchmark.load_baseline``) whose ``fnnet train`` is timed in the same
    rounds.
    """
    ds, net, config = _defaults()
    e1, e2 = sizes["epochs"]
    with tempfile.TemporaryDirectory() as tmp:
        runners = {
            "epochs": _compiled_epochs(net, config, ds, e2 - e1),
            "train_e1": _cli_train(e1, Path(tmp)),
            "train_e2": _cli_train(e2, Path(tmp)),
        }
        if before is not None:
            main = importlib.import_module(f"{before.__name__}.cli").main
            runners["before_e1"] = _cli_train(e1, Path(tmp), main, "b")
            runners["before_e2"] = _cli_train(e2, Path(tmp), main, "b")
        for run in runners.values():  # warm-up: compilation, caches
            run()
        times = {k: [] for k in runners}
        fit_seconds = []
        names = list(runners)
        for r in range(sizes["rounds"]):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                value = runners[name]()
                times[name].append(time.perf_counter() - t0)
                if name == "train_e2":
                    fit_seconds.append(value)
    per_epoch = [t / (e2 - e1) for t in times["epochs"]]
    marginal = [
        (b - a) / (e2 - e1)
        for a, b in zip(times["train_e1"], times["train_e2"], strict=True)
    ]
    extra = {}
    if before is not None:
        old = [
            (b - a) / (e2 - e1)
            for a, b in zip(times["before_e1"], times["before_e2"], strict=True)
        ]
        extra = {
            "before_epoch_ms": 1e3 * statistics.median(old),
            "before_ratio": statistics.median(
                o / p for o, p in zip(old, per_epoch, strict=True)
            ),
        }
    return {
        **extra,
        "compiled_epoch_ms": 1e3 * statistics.median(per_epoch),
        "train_epoch_ms": 1e3 * statistics.median(marginal),
        "ratio": statistics.median(
            m / p for m, p in zip(marginal, per_epoch, strict=True)
        ),
        "fit_ratio": statistics.median(
            f / e2 / p for f, p in zip(fit_seconds, per_epoch, strict=True)
        ),
        "train_e2_wall_s": statistics.median(times["train_e2"]),
        "epochs": (e1, e2),
        "rounds": sizes["rounds"],
    }


def sweep_throughput(sizes: dict, processes: bool = True) -> dict:
    """The sweep against sequential fits and separate processes."""
    ds, net, config = _defaults()
    epochs = sizes["sweep_epochs"]
    config = train.TrainConfig(
        epochs=epochs, batch_size=32, learning_rate=1e-3, optimizer="adam"
    )
    lrs, seeds = sizes["lrs"], sizes["seeds"]
    members = fsweep.members_of(seeds, learning_rate=lrs)
    data = ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val))

    def swept():
        r = fsweep.fit_sweep(
            net, *data, config, seeds=list(seeds), learning_rate=list(lrs)
        )
        jax.block_until_ready(r.params)

    def sequential():
        for m in members:
            run_net, run_config = fsweep.single_run_settings(net, config, m)
            params = run_net.init(jax.random.key(m["seed"]))
            r = train.fit(run_net, params, *data, run_config)
            jax.block_until_ready(r.params)

    times = {"sweep cold": [], "sequential cold": [], "sweep": [], "sequential": []}
    for r in range(sizes["sweep_rounds"]):
        order = [("sweep", swept), ("sequential", sequential)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            jax.clear_caches()
            t0 = time.perf_counter()
            fn()
            times[f"{name} cold"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    result = {k: statistics.median(v) for k, v in times.items()}
    if processes:
        env = {**os.environ, "JAX_PLATFORMS": jax.devices()[0].platform}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            for i, m in enumerate(members):
                cmd = [sys.executable, "-m", "fnnet", "train", "--quiet"]
                cmd += ["--epochs", str(epochs), "--patience", "0"]
                cmd += ["--lr", str(m["learning_rate"]), "--seed", str(m["seed"])]
                cmd += ["--out", str(Path(tmp) / f"p{i}")]
                subprocess.run(cmd, env=env, check=True, capture_output=True)
        result["separate processes"] = time.perf_counter() - t0
    result["members"] = len(members)
    result["epochs"] = epochs
    return result


def report(over: dict, sw: dict | None) -> list[str]:
    """The lines the benchmark prints and writes."""
    e1, e2 = over["epochs"]
    if over["ratio"] <= 0:  # the fixed costs' noise swamped the epochs
        verdict = "not measured: noise larger than the epochs' time"
    else:
        verdict = "met" if over["ratio"] <= OVERHEAD_MAX else "MISSED"
    lines = [
        f"fnnet train defaults on digits: {over['train_epoch_ms']:.3f} ms per epoch "
        f"(marginal, {e1} vs {e2} epochs) vs the compiled epoch alone "
        f"{over['compiled_epoch_ms']:.3f} ms: ratio {over['ratio']:.2f} "
        f"(target <= {OVERHEAD_MAX}: {verdict}); train_seconds/epochs over the "
        f"compiled epoch {over['fit_ratio']:.2f}; a whole {e2}-epoch command "
        f"{over['train_e2_wall_s']:.2f} s (median of {over['rounds']} interleaved "
        "rounds, in-process, compiled functions warm)",
    ]
    if "before_ratio" in over:
        lines.append(
            f"the same measure of `fnnet train` at {over['before_rev']} (before "
            f"this loop), in the same rounds: {over['before_epoch_ms']:.3f} ms per "
            f"epoch, ratio {over['before_ratio']:.2f}"
        )
    if sw is None:
        return lines
    n, e = sw["members"], sw["epochs"]
    work = n * e
    lines.append(
        f"sweep of {n} runs x {e} epochs (digits defaults, lr x seeds): one "
        f"population {sw['sweep']:.2f} s warm ({work / sw['sweep']:.0f} run-epochs/s), "
        f"{sw['sweep cold']:.2f} s cold; the same fits one by one in one process "
        f"{sw['sequential']:.2f} s warm, {sw['sequential cold']:.2f} s cold: sweep "
        f"throughput x{sw['sequential'] / sw['sweep']:.2f} warm, "
        f"x{sw['sequential cold'] / sw['sweep cold']:.2f} cold"
    )
    if "separate processes" in sw:
        lines.append(
            f"the same {n} runs as separate `fnnet train` processes: "
            f"{sw['separate processes']:.2f} s; the sweep (cold, compilation "
            f"included) is x{sw['separate processes'] / sw['sweep cold']:.2f} "
            "their throughput"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument(
        "--no-processes", action="store_true", help="skip the separate processes"
    )
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep")
    parser.add_argument(
        "--baseline-rev",
        default=None,
        metavar="REV",
        help="also time fnnet train of this git revision in the overhead rounds",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    before = None
    if args.baseline_rev is not None:
        try:
            from experiments.benchmark import load_baseline
        except ImportError:  # run as a script: experiments/ itself is on sys.path
            from benchmark import load_baseline
        loaded = load_baseline(args.baseline_rev, "fnnet_before")
        before = loaded.package
    over = overhead(sizes, before)
    if before is not None:
        over["before_rev"] = loaded.rev
    sw = None
    if not args.no_sweep:
        sw = sweep_throughput(sizes, processes=not args.no_processes)
    for line in report(over, sw):
        print(line)
    end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"1-min load average {load:.2f} at the start, {end:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
