"""Nothing silently wrong: bad input, faults and interruptions (issue classes 1-13).

Library cases run in process. Command-line cases run the real ``fnnet``
entry point in subprocesses, each case its own process; independent cases
are started together to share the wait. The faults are real: a read-only
folder (chmod, and ``chattr +i`` for root, whom permissions do not stop),
SIGINT sent to a running process, two runs on one folder at once. Resuming
a run that a signal stopped needs no process of its own: those checks call
``fnnet.cli.main``.
"""

import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet
from fnnet import checkpoint, cli, data
from fnnet.train import TrainConfig, evaluate, fit

ROOT = pathlib.Path(__file__).resolve().parents[1]
_SCRIPT = pathlib.Path(sys.executable).with_name("fnnet")
FNNET = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "fnnet"]
TINY = ["--quiet", "--hidden", "2", "--batch-size", "8"]


# ------------------------------------------------------------ library (API)


@pytest.fixture(scope="module")
def ce_net():
    net = fnnet.MLP(
        (3, 4, 3), activation="tanh", output="softmax", loss="cross_entropy"
    )
    params = net.init(jax.random.key(0), jnp.float64)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)))
    return net, params, x


def _hand_and_auto(net, params, x, y):
    hand = jax.jit(lambda p, x, y: net.backprop(p, x, y))(params, x, y)
    auto = jax.jit(jax.value_and_grad(lambda p, x, y: net.cost(p, x, y)))(params, x, y)
    return hand, auto


def test_class1_invalid_labels_under_jit_are_nan_in_hand_and_auto(ce_net):
    net, params, x = ce_net
    y = jnp.asarray([0, -1, 3, 1])  # -1 used to index from the end; 3 == K
    (J_h, g_h), (J_a, g_a) = _hand_and_auto(net, params, x, y)
    for value in (J_h, J_a, *jax.tree.leaves(g_h), *jax.tree.leaves(g_a)):
        assert np.isnan(np.asarray(value)).all()
    # Per example: exactly the invalid examples are NaN, by both paths.
    losses, grads = jax.jit(lambda p, x, y: net.per_example_grads(p, x, y))(
        params, x, y
    )
    assert np.isnan(losses).tolist() == [False, True, True, False]
    auto = jax.jit(jax.vmap(jax.grad(net.cost), in_axes=(None, 0, 0)))(params, x, y)
    hand_W, auto_W = np.asarray(grads[0]["W"]), np.asarray(auto[0]["W"])
    np.testing.assert_array_equal(np.isnan(hand_W), np.isnan(auto_W))
    assert np.isnan(hand_W[1:3]).all() and np.isfinite(hand_W[[0, 3]]).all()
    np.testing.assert_allclose(hand_W[[0, 3]], auto_W[[0, 3]], rtol=1e-12)


def test_class1_valid_labels_hand_equals_auto(ce_net):
    net, params, x = ce_net
    (J_h, g_h), (J_a, g_a) = _hand_and_auto(net, params, x, jnp.asarray([0, 2, 2, 1]))
    np.testing.assert_allclose(J_h, J_a, rtol=1e-14)
    for h, a in zip(jax.tree.leaves(g_h), jax.tree.leaves(g_a), strict=True):
        np.testing.assert_allclose(h, a, rtol=1e-12, atol=1e-14)


def test_class1_checked_raises_inside_jit(ce_net):
    net, params, x = ce_net
    step = fnnet.checked(jax.jit(lambda p, x, y: net.backprop(p, x, y)))
    J, _ = step(params, x, jnp.asarray([0, 2, 2, 1]))
    assert np.isfinite(J)
    with pytest.raises(fnnet.InputError, match=r"outside \[0, 3\).*e\.g\. -1"):
        step(params, x, jnp.asarray([0, -1, 2, 1]))
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*e\.g\. 5"):
        step(params, x, jnp.asarray([5, 1, 2, 1]))


def _csv(path, rows, header="a,b,y"):
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def _classes(n=30):
    rng = np.random.default_rng(0)
    return [(round(a, 3), round(b, 3), int(a > 0)) for a, b in rng.normal(size=(n, 2))]


def test_class2_value_overflowing_float32_names_line_and_column(tmp_path):
    rows = _classes()
    rows[6] = (1e300, rows[6][1], rows[6][2])
    path = _csv(tmp_path / "o.csv", rows)
    with pytest.raises(data.DataError, match=r"o\.csv: value 1e\+300 at line 8, col"):
        data.load_dataset(path)
    x = np.ones((8, 2))
    x[3, 1] = -1e39
    np.savez(tmp_path / "o.npz", x=x, y=np.arange(8.0))
    with pytest.raises(data.DataError, match=r"o\.npz: value -1e\+39 at x\[3, 1\]"):
        data.load_dataset(tmp_path / "o.npz")


def test_class3_nan_data_is_refused_and_nan_outputs_give_nan_metrics():
    net = fnnet.MLP((2, 3, 2), "relu", "softmax", "cross_entropy")
    params = net.init(jax.random.key(0), jnp.float32)
    x = np.ones((6, 2), np.float32)
    y = np.array([0, 1, 0, 1, 0, 1], np.int32)
    bad = x.copy()
    bad[4, 1] = np.nan
    cfg = TrainConfig(epochs=1, batch_size=3)
    with pytest.raises(fnnet.InputError, match=r"val x holds NaN .*val x\[4, 1\]"):
        fit(net, params, (x, y), (bad, y), cfg)
    with pytest.raises(ValueError, match=r"train x holds NaN"):
        fit(net, params, (bad, y), None, cfg)
    with pytest.raises(fnnet.InputError, match=r"^x holds NaN .*x\[4, 1\]"):
        evaluate(net, params, bad, y)
    # NaN parameters: NaN outputs, so NaN accuracy (never a plausible number).
    nan_params = jax.tree.map(lambda t: jnp.full_like(t, jnp.nan), params)
    result = evaluate(net, nan_params, x, y)
    assert np.isnan(result["accuracy"]) and np.isnan(result["loss"])


def test_class6_softmax_over_one_unit_is_refused():
    with pytest.raises(ValueError, match="softmax.*1 output unit.*cannot learn"):
        fnnet.MLP((3, 1), output="softmax", loss="mse")


def _huge_npz(path, members=("x.npy", "y.npy")):
    """A ~1 KB .npz whose .npy headers claim 16 TB."""
    buf = io.BytesIO()
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**12, 2)}
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(b"\0" * 160)
    with zipfile.ZipFile(path, "w") as z:
        for name in members:
            z.writestr(name, buf.getvalue())
    return path


def test_class10_absurd_declared_sizes_are_refused_before_allocation(tmp_path):
    path = _huge_npz(tmp_path / "huge.npz")
    assert path.stat().st_size < 2000
    with pytest.raises(data.DataError, match=r"huge\.npz: .*declares shape "):
        data.load_npz(path)
    ck = _huge_npz(tmp_path / "ck.npz", ("__fnnet_header__.npy",))
    with pytest.raises(checkpoint.CheckpointError, match=r"ck\.npz: .*holds only"):
        checkpoint.load_meta(ck)


def test_class11_messages_name_the_users_labels_and_file_type(tmp_path):
    rows = [(i, i % 3, ["cat", "dog"][i % 2]) for i in range(20)] + [(1, 2, "eel")]
    with pytest.raises(data.DataError, match="class 'eel' has 1 example"):
        data.load_dataset(_csv(tmp_path / "l.csv", rows))
    renamed = tmp_path / "table.npz"
    shutil.copy(_csv(tmp_path / "t.csv", _classes()), renamed)
    with pytest.raises(data.DataError, match=r"text file.*needs the \.csv ext") as e:
        data.load_npz(renamed)
    assert "pickle" not in str(e.value)


def test_class12_api_errors_name_the_argument():
    net = fnnet.MLP((3, 4, 2))
    params = net.init(jax.random.key(0), jnp.float32)
    with pytest.raises(ValueError, match=r"x is an empty batch, shape \(0, 3\)"):
        net.backprop(params, np.zeros((0, 3), np.float32), np.zeros((0, 2), np.float32))
    with pytest.raises(TypeError, match="key must be a JAX PRNG key.*got int 0"):
        net.init(0)
    nested = [{k: np.asarray(v).tolist() for k, v in layer.items()} for layer in params]
    with pytest.raises(TypeError, match=r"params\[0\]\['W'\] must be an array.*list"):
        net.forward(nested, np.ones((2, 3), np.float32))
    x = np.ones((8, 3), np.float32)
    x[5, 2] = np.nan
    with pytest.raises(ValueError, match=r"train x holds NaN.*x\[5, 2\]") as e:
        fit(net, params, (x, np.zeros((8, 2), np.float32)), None, TrainConfig())
    assert "learning rate" not in str(e.value)


# ------------------------------------------------------------- command line


def _env():
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), path) if p),
    }


def _start(cwd, *args):
    return subprocess.Popen(
        [*FNNET, "train", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _read_only(folder: pathlib.Path) -> bool:
    """Make ``folder`` read-only for real (also for root); False if impossible."""
    folder.chmod(0o555)
    if os.geteuid() == 0:
        ok = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        if ok.returncode != 0:
            return False
    try:
        (folder / ".probe").touch()
    except OSError:
        return True
    return False


def _writable(folder: pathlib.Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


BUGGY_MODULE = """
    import fnnet

    def _h(a):
        raise ValueError("a bug inside the activation")

    buggy = fnnet.Activation("buggy", _h, _h)
"""

CONFIG = {
    "data": "d.csv", "target": None, "task": "auto", "val_fraction": 0.15,
    "test_fraction": 0.2, "hidden": [2], "activation": "relu", "output": None,
    "loss": None, "dtype": "float32", "optimizer": "adam", "lr": 0.001,
    "momentum": 0.9, "epochs": 2, "batch_size": 8, "grad": "hand", "seed": 0,
    "l2": 0.0, "weight_decay": 0.0, "decay_biases": False, "keep_prob": 1.0,
    "noise_std": 0.0, "patience": 20,
}  # fmt: skip


def test_cli_bad_input_and_faults_exit_2_with_a_clear_message(tmp_path):
    """Classes 2, 4 (failed start), 6, 7 (read-only), 9, 11, 13: one process each."""
    _csv(tmp_path / "d.csv", _classes())
    rows = _classes()
    rows[3] = (rows[3][0], "1e300", rows[3][2])
    _csv(tmp_path / "over.csv", rows)
    shutil.copy(tmp_path / "d.csv", tmp_path / "renamed.npz")
    (tmp_path / "fnnet_user_buggy.py").write_text(textwrap.dedent(BUGGY_MODULE))
    ro = tmp_path / "ro"
    ro.mkdir()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text(json.dumps({**CONFIG, "hidden": "8,8"}))
    cases = {
        "overflow": ["--data", "over.csv", "--out", "r1"],
        "renamed": ["--data", "renamed.npz", "--out", "fresh"],
        "softmax": ["--data", "d.csv", "--task", "regression", "--out", "r2"]
        + ["--output", "softmax"],
        "dropout": ["--data", "d.csv", "--dropout", "1.5", "--out", "r3"],
        "read_only": ["--data", "d.csv", "--out", "ro/run"],
        "config": ["--resume", "damaged"],
        "bug": [
            "--data",
            "d.csv",
            "--out",
            "r4",
            "--activation",
            "fnnet_user_buggy:buggy",
        ],
    }
    made_read_only = _read_only(ro)
    try:
        procs = {
            k: _start(tmp_path, *TINY, *v, "--epochs", "1") for k, v in cases.items()
        }
        res = {k: _finish(p) for k, p in procs.items()}
    finally:
        _writable(ro)
    for name, (code, _, err) in res.items():
        if name != "bug":
            assert code == 2 and err.startswith("fnnet train: error: "), (name, err)
            assert "Traceback" not in err, (name, err)
    # 2: a value that overflows float32, by file, line and column.
    assert "over.csv: value 1e+300 at line 5, column 1 ('b')" in res["overflow"][2]
    # 4 and 11: a failed start leaves no folder; a renamed CSV is named so.
    assert not (tmp_path / "fresh").exists()
    err = res["renamed"][2]
    assert "text file" in err and ".csv extension" in err and "pickle" not in err
    # 6: softmax over the single regression output.
    assert "--output: output='softmax' over 1 output unit" in res["softmax"][2]
    # 11: the flag as typed.
    err = res["dropout"][2]
    assert "--dropout" in err and "keep_prob" not in err
    # 7: the path and the cause.
    if made_read_only:
        err = res["read_only"][2]
        assert "ro/run" in err
        assert "Permission denied" in err or "Operation not permitted" in err
    # 9: the file, the key, expected and found.
    err = res["config"][2]
    assert (
        "damaged/config.json: key 'hidden' must be a list of ints, found '8,8'" in err
    )
    # 13: a bug (here in a user's activation) keeps its traceback.
    code, _, err = res["bug"]
    assert code not in (0, 2) and "Traceback" in err
    assert "a bug inside the activation" in err


def _wait_for_checkpoint(proc, path, epochs=1, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and checkpoint.load_meta(path)["epoch"] >= epochs:
            return checkpoint.load_meta(path)["epoch"]
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint: {proc.poll()} {proc.communicate()}")


def test_cli_lock_sigint_resume_checks_and_write_failure(tmp_path, monkeypatch, capsys):
    """Classes 4 (lock), 5 (resume checks), 8 (SIGINT) and 7 (a write fails
    mid-run), on two real runs started together."""
    _csv(tmp_path / "d.csv", _classes())
    run, other = tmp_path / "run", tmp_path / "other"
    long_run = ["--data", "d.csv", "--out", "run", "--epochs", "100000"]
    run.mkdir()  # a failed start of an older fnnet left its config.json
    (run / "config.json").write_text(json.dumps({**CONFIG, "lr": 0.5}))
    a = _start(tmp_path, *TINY, *long_run, "--patience", "0")
    b = _start(tmp_path, *TINY, *long_run[:2], "--out", "other", *long_run[4:])
    _wait_for_checkpoint(a, run / "checkpoint.npz")
    # 4: a second run on the folder exits 2 and names the holder.
    second = _start(tmp_path, *TINY, *long_run)
    # 7: run b's folder turns read-only: its next checkpoint cannot be written.
    _wait_for_checkpoint(b, other / "checkpoint.npz")
    made_read_only = _read_only(other)
    try:
        code_b, _, err_b = _finish(b) if made_read_only else (b.kill(), 0, "")
    finally:
        _writable(other)
    code, _, err = _finish(second)
    assert code == 2 and f"in use by another fnnet run (pid {a.pid} on " in err
    # 8: SIGINT stops cleanly with a good checkpoint and the resume command.
    a.send_signal(signal.SIGINT)
    code, _, err = _finish(a)
    assert code == 130 and "Traceback" not in err, err
    epoch = checkpoint.load_meta(run / "checkpoint.npz")["epoch"]
    assert f"checkpoint of epoch {epoch} is kept" in err
    command = err.split("resume with: ")[1].split()
    assert command == ["fnnet", "train", "--resume", "run"]
    settings = json.loads((run / "config.json").read_text())  # the run's own
    assert settings["fingerprint"]["rows"] == [20, 4, 6] and settings["lr"] == 0.001
    # The resumes below need no process of their own (no signal, no lock
    # held): the printed command runs through fnnet.cli.main in this one.
    monkeypatch.chdir(tmp_path)

    def resume(*flags):
        code = cli.main([*command[1:], *flags])
        return code, capsys.readouterr().err

    # 5: a changed data file is refused, naming the change; a flag that
    # differs from the saved setting is an error.
    original = (tmp_path / "d.csv").read_text()
    (tmp_path / "d.csv").write_text(original + "0.5,0.5,1\n")
    code, err = resume("--lr", "0.5")
    assert code == 2 and "--lr 0.5 (saved: 0.001)" in err, err
    code, err = resume("--quiet")
    assert code == 2 and "the data changed since the run started" in err, err
    (tmp_path / "d.csv").write_text(original)
    # 5: --epochs is applied and reported; the printed command resumes.
    code, err = resume("--epochs", str(epoch + 1))
    assert code == 0, err
    assert f"--epochs changed from 100000 to {epoch + 1}" in err
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == epoch + 1
    # 7 (run b): exit 2, the path and the cause, the checkpoint kept.
    if not made_read_only:
        pytest.skip("cannot make a folder read-only here")
    assert code_b == 2 and "Traceback" not in err_b, err_b
    kept = checkpoint.load_meta(other / "checkpoint.npz")["epoch"]
    assert str(other) in err_b
    assert "Permission denied" in err_b or "Operation not permitted" in err_b
    assert f"checkpoint of epoch {kept} is kept" in err_b
    assert "fnnet train --resume" in err_b
