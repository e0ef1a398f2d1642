"""A run folder as a model: load_run, fnnet predict / evaluate / export.

Runs are trained once per module on small CSVs written here, in units far
from 0 and 1 and with string labels, as a user's file would be. The held-back
raw rows are found again with the training split's public function, so the
metrics a loaded run computes on them can be held against those training
reported.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import fnnet
from fnnet import checkpoint as ckpt
from fnnet import data as fdata
from fnnet import run as frun
from fnnet.cli import main

ANIMALS = np.array(["cat", "dog", "emu"])
SCALES, SHIFTS = np.array([1.0, 10.0, 100.0]), np.array([5.0, 1000.0, -3.0])


def _raw_features(n, seed):
    return np.random.default_rng(seed).standard_normal((n, 3)) * SCALES + SHIFTS


def _animals(x):
    z = (x - SHIFTS) / SCALES
    return ANIMALS[np.where(z[:, 0] + z[:, 1] > 0.3, 0, np.where(z[:, 2] > 0, 1, 2))]


def _price(x):
    return 3.0 * x[:, 0] + 0.02 * x[:, 1] + 500.0


def _write_csv(path, header, columns):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header is not None:
            w.writerow(header)
        w.writerows(zip(*columns, strict=True))
    return path


def _held_back(path, target, task, seed=0):
    """The raw test rows of a run trained on ``path`` with the default split."""
    x, y, task = fdata.load_csv(path, target=target, task=task)
    *_, (x_te, y_te) = fdata.split(x, y, task=task, seed=seed)
    return x_te, y_te


@pytest.fixture(scope="module")
def csvs(tmp_path_factory):
    """Training files: string labels, a regression target, two string classes."""
    root = tmp_path_factory.mktemp("csvs")
    x = _raw_features(160, seed=0)
    cols = [x[:, 0], x[:, 1], x[:, 2]]
    two = np.where(_animals(x) == "cat", "cat", "other")
    return {
        "animals": _write_csv(
            root / "animals.csv", ["a", "b", "c", "animal"], [*cols, _animals(x)]
        ),
        "prices": _write_csv(
            root / "prices.csv", ["a", "b", "c", "price"], [*cols, _price(x)]
        ),
        "binary": _write_csv(
            root / "binary.csv", ["a", "b", "c", "kind"], [*cols, two]
        ),
    }


@pytest.fixture(scope="module")
def runs(csvs, tmp_path_factory):
    """Three trained runs: string labels (softmax), regression, two classes (bce)."""
    root = tmp_path_factory.mktemp("runs")
    fast = ["--quiet", "--hidden", "8", "--epochs", "3", "--lr", "0.01"]
    made = {}
    for name, extra in (
        ("animals", []),  # early stopping on: the best epoch's params
        ("prices", ["--patience", "0"]),  # off: the last epoch's
        ("binary", ["--loss", "bce", "--epochs", "2"]),
    ):
        out = root / name
        argv = ["train", "--data", str(csvs[name]), "--out", str(out), *fast, *extra]
        assert main(argv) == 0
        made[name] = (out, csvs[name])
    return made


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


# ------------------------------------------------------------ from Python


def test_string_labels_reproduce_the_reported_test_metrics(runs):
    out, path = runs["animals"]
    run = fnnet.load_run(out)
    assert run.classes == ("cat", "dog", "emu") and run.features == ("a", "b", "c")
    x_te, y_te = _held_back(path, None, None)
    assert y_te.dtype.kind == "U"  # raw labels as the file has them
    reported = _metrics(out)
    got = run.evaluate(x_te, y_te)
    assert got["accuracy"] == reported["test_accuracy"]
    np.testing.assert_allclose(got["loss"], reported["test_loss"], rtol=1e-5)
    predicted = run.predict(x_te)
    assert predicted.dtype.kind == "U" and set(predicted) <= set(ANIMALS)
    assert np.mean(predicted == y_te) == reported["test_accuracy"]
    proba = run.predict_proba(x_te)
    assert proba.shape == (len(x_te), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert (ANIMALS[np.argmax(proba, axis=1)] == predicted).all()


def test_regression_round_trip_in_the_users_units(runs):
    out, path = runs["prices"]
    run = fnnet.load_run(out)
    x_all, y_all, _ = fdata.load_csv(path, target="price")
    (x_tr, y_tr), _, (x_te, y_te) = fdata.split(x_all, y_all, task="regression")
    # The scaling is the training split's own, to the last bit.
    np.testing.assert_array_equal(run.x_mean, x_tr.mean(axis=0))
    np.testing.assert_array_equal(run.y_mean, [y_tr.mean()])
    np.testing.assert_array_equal(run.y_std, [y_tr.std()])
    reported = _metrics(out)
    got = run.evaluate(x_te, y_te)
    np.testing.assert_allclose(got["r2"], reported["test_r2"], rtol=1e-5)
    np.testing.assert_allclose(got["loss"], reported["test_loss"], rtol=1e-5)
    pred = run.predict(x_te)
    assert pred.shape == y_te.shape and pred.dtype == np.float64
    # Values in the file's units (around 500), and R² / RMSE of them in NumPy.
    rmse = np.sqrt(np.mean((pred - y_te) ** 2))
    np.testing.assert_allclose(got["rmse"], rmse, rtol=1e-6)
    r2 = 1 - np.sum((pred - y_te) ** 2) / np.sum((y_te - y_te.mean()) ** 2)
    np.testing.assert_allclose(r2, reported["test_r2"], rtol=1e-4)
    assert abs(np.mean(pred) - 500) < 50
    with pytest.raises(ValueError, match="predict_proba applies to classifiers"):
        run.predict_proba(x_te)


def test_two_class_sigmoid_run(runs):
    out, path = runs["binary"]
    run = fnnet.load_run(out)
    x_te, y_te = _held_back(path, None, None)
    assert run.net.loss == "bce" and run.classes == ("cat", "other")
    got = run.evaluate(x_te, y_te)
    assert got["accuracy"] == _metrics(out)["test_accuracy"]
    proba = run.predict_proba(x_te)
    assert proba.shape == (len(x_te), 2)
    expected = np.where(proba[:, 1] > 0.5, "other", "cat")
    assert (run.predict(x_te) == expected).all()


def test_chunked_calls_match_one_call(runs, monkeypatch):
    run = fnnet.load_run(runs["animals"][0])
    x = _raw_features(37, seed=5)
    whole = run.outputs(x)
    monkeypatch.setattr(frun, "CHUNK_ROWS", 8)  # 5 chunks, the last one padded
    np.testing.assert_allclose(run.outputs(x), whole, rtol=1e-6, atol=1e-7)
    assert run.predict(x[:1]).shape == (1,)


def test_python_bad_input_is_named(runs):
    run = fnnet.load_run(runs["animals"][0])
    x = _raw_features(4, seed=1)
    with pytest.raises(ValueError, match=r"x_raw must have shape \(N, 3\)"):
        run.predict(x[:, :2])
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"x_raw\[2, 1\] is nan"):
        run.predict(bad)
    with pytest.raises(ValueError, match="label 'yak' at row 1 is not one of"):
        run.evaluate(x[:2], ["cat", "yak"])
    with pytest.raises(ckpt.CheckpointError, match="no such folder"):
        fnnet.load_run(runs["animals"][0] / "nope")


def test_label_indices_match_labels_as_written():
    # Integer classes accept integer-valued numbers and their text.
    got = fdata.label_indices(np.array(["3", "1.0", "3"]), (1, 3), "y")
    np.testing.assert_array_equal(got, [1, 0, 1])
    np.testing.assert_array_equal(fdata.label_indices([3.0, 1], (1, 3), "y"), [1, 0])
    # String classes match text exactly: "1" is not "1.0".
    np.testing.assert_array_equal(
        fdata.label_indices(["b", "1"], ("1", "b"), "y"), [1, 0]
    )
    with pytest.raises(fdata.DataError, match=r"y: label '1.0' at row 0 is not one"):
        fdata.label_indices(["1.0"], ("1", "b"), "y")
    with pytest.raises(fdata.DataError, match=r"label 2.5 at row 1 is not one"):
        fdata.label_indices([1, 2.5], (1, 3), "y")


def test_scale_x_gives_the_training_rows_bit_for_bit(csvs):
    path = csvs["prices"]
    ds = fdata.load_dataset(path)
    x, y, _ = fdata.load_csv(path)
    (x_tr, _), _, _ = fdata.split(x, y, task="regression")
    np.testing.assert_array_equal(ds.scale_x(x_tr), ds.x_train)


# ------------------------------------------------------------ the shell


def test_predict_and_evaluate_from_the_shell(runs, tmp_path, capsys):
    out, path = runs["animals"]
    x_te, y_te = _held_back(path, None, None)
    reported = _metrics(out)
    # Columns in another order than training's, target included.
    cols = [x_te[:, 2], x_te[:, 0], y_te, x_te[:, 1]]
    test_csv = _write_csv(tmp_path / "test.csv", ["c", "a", "animal", "b"], cols)
    preds = tmp_path / "preds.csv"
    argv = ["predict", "--run", str(out), "--data", str(test_csv), "--out"]
    assert main([*argv, str(preds)]) == 0
    printed = capsys.readouterr().out
    assert f"accuracy={reported['test_accuracy']:.6g}" in printed
    rows = list(csv.DictReader(preds.open()))
    assert list(rows[0]) == ["prediction", "p_cat", "p_dog", "p_emu"]
    run = fnnet.load_run(out)
    assert [r["prediction"] for r in rows] == run.predict(x_te).tolist()
    proba = np.array([[float(r[f"p_{a}"]) for a in ANIMALS] for r in rows])
    np.testing.assert_array_equal(proba, run.predict_proba(x_te))

    # Without the target column, and without a header (by position).
    bare = _write_csv(tmp_path / "bare.csv", None, [x_te[:, 0], x_te[:, 1], x_te[:, 2]])
    assert main(["predict", "--run", str(out), "--data", str(bare)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("prediction,") and len(lines) == len(x_te) + 1
    assert [ln.split(",")[0] for ln in lines[1:]] == run.predict(x_te).tolist()
    assert "accuracy" not in captured.err

    assert main(["evaluate", "--run", str(out), "--data", str(test_csv)]) == 0
    written = json.loads((out / "evaluation-test.json").read_text())
    assert written["accuracy"] == reported["test_accuracy"]
    assert written["n"] == len(x_te)


def test_regression_predictions_from_the_shell(runs, tmp_path):
    out, path = runs["prices"]
    x_te, y_te = _held_back(path, "price", "regression")
    new = _write_csv(tmp_path / "new.csv", ["a", "b", "c"], list(x_te.T))
    preds = tmp_path / "p.csv"
    argv = ["predict", "--run", str(out), "--data", str(new), "--out", str(preds)]
    assert main(argv) == 0
    rows = list(csv.DictReader(preds.open()))
    assert list(rows[0]) == ["prediction"]
    written = np.array([float(r["prediction"]) for r in rows])
    np.testing.assert_array_equal(written, fnnet.load_run(out).predict(x_te))


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("1,2\n3,4\n", "wrong number of columns: 2 on line 1; the model takes 3"),
        ("a,b,weight\n1,2,3\n", r"column\(s\) \['weight'\] not among those"),
        ("a,b\n1,2\n", r"missing feature column\(s\) \['c'\]"),
        ("a,b,c\n1,nan,3\n", r"NaN cell 'nan' at line 2, column 1 \('b'\)"),
        ("a,b,c,animal\n1,2,3,yak\n", "label 'yak' at line 2, column 3"),
        ("a,b,c\n", "no data rows"),
    ],
)
def test_bad_csv_exits_2_naming_the_problem(runs, tmp_path, capsys, rows, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(rows)
    argv = ["predict", "--run", str(runs["animals"][0]), "--data", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fnnet predict: error: ")
    assert re.search(message, err), err


def test_run_folder_without_a_checkpoint_exits_2(tmp_path, capsys, csvs):
    (tmp_path / "config.json").write_text("{}")  # killed before epoch 1 ended
    data = csvs["animals"]
    for command in ("predict", "evaluate", "export"):
        argv = [command, "--run", str(tmp_path)]
        argv += ["--data", str(data)] if command != "export" else []
        assert main(argv) == 2
        assert "has no finished checkpoint" in capsys.readouterr().err


def test_evaluate_needs_the_target_column(runs, tmp_path, capsys):
    out = runs["animals"][0]
    new = _write_csv(tmp_path / "x.csv", ["a", "b", "c"], [[1.0], [2.0], [3.0]])
    assert main(["evaluate", "--run", str(out), "--data", str(new)]) == 2
    assert "no target column ('animal')" in capsys.readouterr().err


# ------------------------------------------------------------ export


def _numpy_forward(tensors, network, x_raw):
    """The network from the exported file, in plain NumPy (relu, softmax)."""
    z = (x_raw - tensors["x_mean"]) / tensors["x_std"]
    L = len(network["sizes"]) - 1
    assert network["activation"] == "relu"
    for l in range(1, L + 1):
        W, b = tensors[f"layer{l}.W"], tensors[f"layer{l}.b"]
        a = z @ W.T.astype(np.float64) + b
        z = np.maximum(a, 0.0) if l < L else a
    if network["output"] == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return z


def test_safetensors_export_predicts_the_same_in_numpy(runs, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    for name in ("animals", "prices"):
        out, _ = runs[name]
        file = tmp_path / f"{name}.safetensors"
        argv = ["export", "--run", str(out), "--format", "safetensors"]
        assert main([*argv, "--out", str(file)]) == 0
        assert str(file) in capsys.readouterr().out
        tensors = load_file(file)
        with safe_open(file, "np") as f:
            meta = f.metadata()
        network = json.loads(meta["network"])
        run = fnnet.load_run(out)
        x = _raw_features(50, seed=3)
        z = _numpy_forward(tensors, network, x)
        if name == "animals":
            assert json.loads(meta["classes"]) == ["cat", "dog", "emu"]
            np.testing.assert_allclose(z, run.predict_proba(x), atol=1e-6)
            labels = np.array(json.loads(meta["classes"]))[z.argmax(axis=1)]
            assert (labels == run.predict(x)).all()
        else:
            assert set(tensors) == {
                "layer1.W", "layer1.b", "layer2.W", "layer2.b",
                "x_mean", "x_std", "y_mean", "y_std",
            }  # fmt: skip
            y = z[:, 0] * tensors["y_std"][0] + tensors["y_mean"][0]
            np.testing.assert_allclose(y, run.predict(x), rtol=1e-6)


def test_safetensors_export_predicts_the_same_in_torch(runs, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    out, _ = runs["animals"]
    run = fnnet.load_run(out)
    file = frun.export_safetensors(run, tmp_path / "m.safetensors")
    t = load_file(file)
    x = _raw_features(20, seed=4)
    z = (torch.tensor(x) - t["x_mean"]) / t["x_std"]
    z = torch.relu(z.float() @ t["layer1.W"].T + t["layer1.b"])
    p = torch.softmax(z @ t["layer2.W"].T + t["layer2.b"], dim=1)
    np.testing.assert_allclose(p.numpy(), run.predict_proba(x), atol=1e-6)


# ------------------------------------------------------------ kill -9 mid-save

HANG_ON_SAVE = """
    import os, sys, time
    import numpy as np
    from fnnet.cli import main

    real_savez, calls = np.savez, []

    def savez(file, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third checkpoint: die halfway through it
            file.write(b"PK\\x03\\x04 half an archive")
            file.flush()
            open(sys.argv[2], "w").close()
            time.sleep(600)
        return real_savez(file, *args, **kwargs)

    np.savez = savez
    main(["train", "--data", sys.argv[1], "--out", sys.argv[3], "--quiet",
          "--hidden", "8", "--epochs", "50", "--checkpoint-every", "1"])
"""


def test_kill_9_during_a_save_leaves_a_loadable_run(csvs, tmp_path, capsys):
    data = csvs["animals"]
    marker, out = tmp_path / "saving", tmp_path / "killed"
    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent(HANG_ON_SAVE))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(script), str(data), str(marker), str(out)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never reached its 3rd save"
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1].decode()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # in the middle of the save
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The half-written archive is there, never renamed over the checkpoint.
    assert list(out.glob(".checkpoint.npz.*.tmp"))
    assert not (out / "metrics.json").exists()
    run = fnnet.load_run(out)
    assert run.epoch == 2 and run.classes == ("cat", "dog", "emu")
    x = _raw_features(6, seed=2)
    assert set(run.predict(x)) <= set(ANIMALS)
    assert main(["predict", "--run", str(out), "--data", str(data)]) == 0
    assert "accuracy=" in capsys.readouterr().err


def test_a_run_from_before_the_model_record_is_refused(runs, tmp_path):
    out = runs["animals"][0]
    meta = ckpt.load_meta(out / "checkpoint.npz")
    del meta["info"]["model"]
    old = tmp_path / "old"
    old.mkdir()
    with np.load(out / "checkpoint.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["__fnnet_meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(old / "checkpoint.npz", **arrays)
    with pytest.raises(ckpt.CheckpointError, match="holds no model record"):
        fnnet.load_run(old)
