"""The benchmark harness (experiments/benchmark.py): a smoke run and its API."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "benchmark.py"
COLUMNS = [
    "device",
    "workload",
    "sizes",
    "batch",
    "kind",
    "implementation",
    "step_ms",
    "samples_per_s",
    "vs_hand_epoch",
    "roofline_fraction",
    "gflops",
]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("fnnet_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_csv_and_markdown(tmp_path):
    # A subprocess: the script runs with JAX's defaults, not this session's
    # float64 and strict-promotion settings.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-peers", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[skip] peers (--no-peers)" in proc.stdout
    assert "== targets" in proc.stdout
    platform = jax.devices()[0].platform
    csv_path = tmp_path / f"benchmark_{platform}.csv"
    md_path = tmp_path / f"benchmark_{platform}.md"
    assert csv_path.exists() and md_path.exists()

    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    impls = {(r["workload"], r["implementation"]) for r in rows}
    for workload in ("small", "medium"):
        for impl in (
            "fnnet hand epoch",
            "fnnet jax.grad epoch",
            "fnnet hand step",
            "fnnet jax.grad step",
            "per-example hand (vmap)",
            "per-example jax.grad (vmap)",
            "roofline: products alone",
        ):
            assert (workload, impl) in impls, (workload, impl)
    assert not any(r["kind"] == "peer" for r in rows)  # --no-peers
    for r in rows:
        assert float(r["step_ms"]) > 0, r
        assert r["device"].startswith("jax ")
    hand = [r for r in rows if r["implementation"] == "fnnet hand epoch"]
    assert all(float(r["vs_hand_epoch"]) == 1.0 for r in hand)
    assert all(0 < float(r["roofline_fraction"]) for r in hand)

    md = md_path.read_text()
    assert md.startswith("Machine: jax ")
    assert "| workload | implementation | step ms | samples/s |" in md
    assert "### Targets" in md
    assert "compile 4-layer hand step" in md
    assert "no retracing" in md


def test_step_times_in_process():
    bench = _load_benchmark()
    times = bench.step_times((8, 16, 4), 8, repeats=3)
    assert set(times) == {"hand", "auto", "per_example_hand", "per_example_auto"}
    assert all(isinstance(t, float) and 0 < t < 1 for t in times.values())


def test_step_products_count_the_flops():
    bench = _load_benchmark()
    # forward Z W^T and backward Delta^T Z for each layer, Delta W for 2..L
    products = bench.step_products((784, 512, 10), 256)
    assert [p[0].split(" ")[0] for p in products] == ["A1", "dW1", "A2", "dW2", "D2"]
    expected = 2 * 256 * (3 * 512 * 10 + 2 * 784 * 512)
    assert bench.step_flops((784, 512, 10), 256) == expected
