"""`python -m experiments --quick` runs every study and writes sane results."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments", "--tiny", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_every_study_writes_csv_markdown_and_png(quick):
    out, _ = quick
    for name in (
        "gradient.csv",
        "gradient_eps.csv",
        "gradient_saturation.csv",
        "gradient_kink.csv",
        "gradient_jit.csv",
        "gradient.md",
        "gradient_depth.png",
        "gradient_heatmap.png",
        "gradient_eps.png",
        "regularization.csv",
        "regularization_curves.csv",
        "regularization.md",
        "regularization.png",
        "results_table.csv",
        "results_table.md",
    ):
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 500_000


def test_gradient_csv(quick):
    out, _ = quick
    rows = read_csv(out / "gradient.csv")
    assert set(rows[0]) >= {
        "activation",
        "depth",
        "width",
        "output",
        "loss",
        "dtype",
        "layer",
        "hand_vs_auto",
        "hand_vs_fd",
        "auto_vs_fd",
    }
    assert {r["dtype"] for r in rows} == {"float32", "float64"}
    f64 = [r for r in rows if r["dtype"] == "float64"]
    assert max(float(r["hand_vs_auto"]) for r in f64) < 1e-10
    assert max(float(r["hand_vs_fd"]) for r in f64) < 1e-5
    f32 = [r for r in rows if r["dtype"] == "float32"]
    assert max(float(r["hand_vs_auto"]) for r in f32) < 1e-5
    jit = read_csv(out / "gradient_jit.csv")
    assert (
        max(float(r["hand_vs_auto_max"]) for r in jit if r["dtype"] == "float64")
        < 1e-10
    )
    kink = {
        (r["activation"], float(r["offset"])): r
        for r in read_csv(out / "gradient_kink.csv")
    }
    # FD straddling a ReLU kink is off by O(1); away from it, and for softplus, exact
    assert float(kink["relu", 0.0]["hand_vs_fd"]) > 0.1
    assert float(kink["softplus", 0.0]["hand_vs_fd"]) < 1e-6
    assert "Where and why they differ" in (out / "gradient.md").read_text()


def test_regularization_csv(quick):
    out, _ = quick
    rows = read_csv(out / "regularization.csv")
    variants = {"none", "l2", "dropout", "early_stopping"}
    # --tiny: digits, 120 training rows, 3 epochs, seeds 0 and 1; one row per
    # (seed, variant).
    assert sorted((r["seed"], r["variant"]) for r in rows) == sorted(
        (seed, v) for seed in ("0", "1") for v in variants
    )
    by = {(r["seed"], r["variant"]): r for r in rows}
    for r in rows:
        assert r["dataset"] == "digits" and int(r["n_train"]) == 120
        epochs_run, best = int(r["epochs_run"]), int(r["best_epoch"])
        assert 1 <= best <= epochs_run <= 3
        if r["variant"] != "early_stopping":
            assert epochs_run == 3
    # Another seed or a penalty changes the result.
    assert by["0", "none"]["test_loss"] != by["1", "none"]["test_loss"]
    assert by["0", "none"]["test_loss"] != by["0", "l2"]["test_loss"]
    # The curves (seed 0) end where the table's parameters were taken: the
    # last epoch, or the best one with early stopping; same losses.
    curves = read_csv(out / "regularization_curves.csv")
    assert set(curves[0]) >= {"dataset", "variant", "epoch", "train_loss", "val_loss"}
    for v in variants:
        row = by["0", v]
        mine = [c for c in curves if c["variant"] == v]
        assert [int(c["epoch"]) for c in mine] == list(
            range(1, int(row["epochs_run"]) + 1)
        )
        at = int(row["best_epoch"] if v == "early_stopping" else row["epochs_run"])
        curve = mine[at - 1]
        for key in ("train_loss", "val_loss"):
            assert float(curve[key]) == pytest.approx(float(row[key]), rel=1e-5), v


def test_results_table(quick):
    out, _ = quick
    rows = read_csv(out / "results_table.csv")
    assert {r["grad"] for r in rows} == {"hand", "auto"}
    assert set(rows[0]) >= {"dataset", "seed", "grad", "metric", "value"}
    # hand and jax.grad train the same network to the same result (float32
    # gradients agree to ~1e-7), seed by seed.
    runs = {(r["seed"], r["grad"]): r for r in rows}
    seeds = {r["seed"] for r in rows}
    assert len(runs) == len(rows) == 2 * len(seeds)
    for seed in seeds:
        hand, auto = runs[seed, "hand"], runs[seed, "auto"]
        assert hand["epochs_run"] == auto["epochs_run"]
        assert float(hand["test_loss"]) == pytest.approx(
            float(auto["test_loss"]), rel=1e-3
        )
    text = (out / "results_table.md").read_text()
    assert "seed 0 hand" in text and "seed 0 auto" in text and "target" in text


def test_speed_written_or_skipped_with_a_reason(quick):
    out, proc = quick
    files = list(out.glob("speed_*.csv"))
    if not files:  # the benchmark harness is not there: skipped, with a message
        assert "speed: SKIPPED" in proc.stdout + proc.stderr
        return
    rows = read_csv(files[0])
    assert set(rows[0]) >= {
        "platform",
        "device_kind",
        "sizes",
        "batch",
        "hand_ms",
        "auto_ms",
        "per_example_hand_ms",
        "per_example_auto_ms",
    }
    assert all(float(r["hand_ms"]) > 0 and float(r["auto_ms"]) > 0 for r in rows)
    assert files[0].with_suffix(".png").exists()
    assert files[0].with_suffix(".md").exists()


def test_dp_study(quick):
    out, _ = quick
    rows = read_csv(out / "dp_study.csv")
    assert {"none", "1.5"} <= {r["sigma"] for r in rows}
    for r in rows:
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0
        if r["sigma"] not in ("none", "0.0"):
            assert 0 < float(r["epsilon"]) < 100
    curve = read_csv(out / "dp_noise_scale.csv")
    assert curve and all(float(c["noise_trace"]) > 0 for c in curve)
    speed = {r["kind"] for r in read_csv(out / "dp_speed.csv")}
    assert speed == {"hand step", "norms", "clipped", "vmap norms", "vmap clipped"}
    assert (out / "dp_study.png").stat().st_size > 0
    assert "test accuracy" in (out / "dp_study.md").read_text()
