"""The benchmark harness (experiments/benchmark.py): a smoke run and its API."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import fnnet

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
        [sys.executable, str(SCRIPT), "--tiny", "--no-peers", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
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

    # The pre-change baseline: timed against the library, or skipped with why
    # (no git, a source tarball, a shallow clone).
    baseline_rows = [r for r in rows if r["kind"] == "baseline"]
    if "baseline skipped: " in proc.stdout:
        assert not baseline_rows
        assert "baseline skipped: " in md
    else:
        assert "== pre-change baseline" in proc.stdout
        assert {r["workload"] for r in baseline_rows} == {"small", "medium"}
        for r in baseline_rows:
            assert r["implementation"].startswith("pre-change fnnet (")
            assert r["implementation"].endswith(") hand epoch")
            assert float(r["vs_hand_epoch"]) > 0
            assert r["implementation"] in proc.stdout
        for workload in ("small", "medium"):
            assert f"{workload}: library hand epoch / pre-change (" in md


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


def test_rename_imports_rewrites_every_form():
    bench = _load_benchmark()
    source = (
        '"""Docs name fnnet.train and import fnnet in prose."""\n'
        "from fnnet.network import (\n    MLP,\n)\n"
        "from fnnet import checkpoint as ckpt\n"
        "import fnnet\n"
        "import fnnet.losses\n"
        "import fnnet.data as fdata  # a comment\n"
        "def f():\n    from fnnet.gradcheck import gradcheck\n"
        "import fnnetwork\n"
    )
    out = bench.rename_imports(source, "fnnet_old")
    assert out.splitlines() == [
        '"""Docs name fnnet.train and import fnnet in prose."""',
        "from fnnet_old.network import (",
        "    MLP,",
        ")",
        "from fnnet_old import checkpoint as ckpt",
        "import fnnet_old as fnnet",
        "import fnnet_old.losses; import fnnet_old as fnnet",
        "import fnnet_old.data as fdata  # a comment",
        "def f():",
        "    from fnnet_old.gradcheck import gradcheck",
        "import fnnetwork",
    ]


def test_baseline_without_git_or_revision_says_why(tmp_path, monkeypatch):
    bench = _load_benchmark()
    # A reason to print after "baseline skipped: ", never a traceback.
    with pytest.raises(RuntimeError, match="."):
        bench.load_baseline("no-such-revision-0123")  # or a shallow clone
    monkeypatch.setattr(bench, "REPO_ROOT", tmp_path)  # a tarball: no .git
    with pytest.raises(RuntimeError, match="."):
        bench.load_baseline("HEAD")


def test_baseline_loads_apart_from_the_working_tree():
    bench = _load_benchmark()
    try:
        baseline = bench.load_baseline(bench.BASELINE_REV)
    except RuntimeError as e:  # no git, a tarball, a shallow clone
        pytest.skip(f"baseline skipped: {e}")
    assert bench.load_baseline(bench.BASELINE_REV) is baseline  # loaded once
    assert baseline.package.__name__ == "fnnet_baseline"
    assert baseline.package.MLP is not fnnet.MLP
    modules = [m for n, m in sys.modules.items() if n.startswith("fnnet_baseline")]
    assert any(m.__name__ == "fnnet_baseline.train" for m in modules)
    for module in modules:  # none of it read from the working tree
        assert not Path(module.__file__).resolve().is_relative_to(ROOT), module


def test_gpu_workloads_path_runs_on_any_backend(tmp_path, monkeypatch, capsys):
    # The accelerator section (chosen by default on a GPU) with tiny sizes:
    # both precisions, the device's product rate, hand / jax.grad intervals.
    bench = _load_benchmark()
    tiny = {"tiny": bench.AccelWorkload((6, 8, 3), 4, 2, 1)}
    monkeypatch.setattr(bench, "QUICK_GPU_WORKLOADS", tiny)
    monkeypatch.setattr(bench, "QUICK_RATE_SIZE", 16)
    # compile_section runs in the quick run above; here it would only add time.
    compiled = {"hand step": 0.25, "auto step": 0.5}
    monkeypatch.setattr(bench, "compile_section", lambda *a, **k: ([], compiled))
    args = ["--gpu-workloads", "--quick", "--no-peers", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    platform = jax.devices()[0].platform
    stem = "benchmark_gpu" if platform == "gpu" else f"benchmark_{platform}"
    md = tmp_path / f"{stem}{'' if platform == 'gpu' else '_gpu_workloads'}.md"
    text = md.read_text()
    for precision in ("default", "highest"):
        for impl in ("fnnet hand epoch", "fnnet jax.grad epoch"):
            assert f"| tiny 6-8-3 b4 | {impl} | {precision} |" in text
        assert f"tiny, {precision}: hand / jax.grad " in text
        assert f"TFLOP/s at {precision!r}" in text
    assert "| % of rate |" in text and "PyTorch skipped: --no-peers" in text
    assert "hand step 0.250 s, auto step 0.500 s" in text
    assert bench.main(["--gpu-workloads", "--workloads", "nope"]) == 2
    assert "unknown workloads ['nope']" in capsys.readouterr().out
