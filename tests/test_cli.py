"""The command line, run as a user would: flags, files written, bad input, resume."""

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from fnnet import checkpoint as ckpt
from fnnet import cli
from fnnet.cli import build_parser, main
from fnnet.run import load_run
from fnnet.train import TrainConfig

FAST = ["--quiet", "--hidden", "16", "--epochs", "3"]


def _run(tmp_path, *flags, name="run"):
    out = tmp_path / name
    code = main(["train", "--out", str(out), *flags])
    return code, out


def _ckpt_leaves(path):
    """Every array of a checkpoint file, by member name (no template needed)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_train_writes_every_result_file(tmp_path, capsys):
    code, out = _run(tmp_path, *FAST)
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "history.csv", "checkpoint.npz", "config.json"} <= names
    assert "loss_curve.png" in names
    m = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "epochs_run", "best_epoch"):
        assert key in m
    assert {"train_seconds", "config"} <= set(m)
    assert 0.5 < m["test_accuracy"] <= 1 and m["epochs_run"] == 3
    assert m["config"]["data"] == "digits" and m["config"]["grad"] == "hand"
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(rows[0])
    assert "test_accuracy=" in capsys.readouterr().out
    # No --check-every: no gradient check columns or metrics.
    assert not [k for k in rows[0] if k.startswith("grad_")]
    assert not [k for k in m if k.startswith("grad_")]


def test_regression_reports_r2(tmp_path):
    code, out = _run(tmp_path, "--data", "diabetes", *FAST)
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "test_r2" in m and "test_accuracy" not in m


def test_bce_on_two_classes(tmp_path):
    flags = ["--data", "breast_cancer", "--loss", "bce", "--quiet", "--epochs", "20"]
    code, out = _run(tmp_path, *flags)
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_accuracy"] > 0.9


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = (
        "--data --hidden --activation --output --loss --optimizer --lr --epochs "
        "--batch-size --l2 --weight-decay --dropout --keep-prob --patience --seed "
        "--grad --out --resume --quiet --noise-std"
    ).split()
    for flag in flags:
        assert flag in text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "-1"], "learning_rate must be finite and >= 0"),
        (["--epochs", "0"], "epochs must be a positive int"),
        (["--batch-size", "0"], "batch_size must be a positive int"),
        (["--activation", "swish"], "activation 'swish' is not supported"),
        (["--keep-prob", "1.5"], r"keep_prob must be a float in \(0, 1\]"),
        (["--data", "mnist"], "mnist"),
        (["--data", "wine", "--loss", "bce"], "bce needs two classes"),
        (["--data", "diabetes", "--loss", "cross_entropy"], "needs a classification"),
    ],
)
def test_bad_values_exit_2_with_a_message(tmp_path, capsys, flags, message):
    code, _ = _run(tmp_path, "--quiet", *flags)
    assert code == 2
    err = capsys.readouterr().err
    assert "fnnet train: error:" in err
    assert re.search(message, err)


@pytest.mark.parametrize(
    "flags", [["--optimizer", "lbfgs"], ["--epochs", "ten"], ["--grad", "numeric"]]
)
def test_argparse_rejects_bad_choices_with_exit_2(flags):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *flags])
    assert exit_info.value.code == 2


def test_csv_files_good_and_broken(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 3))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    good = tmp_path / "good.csv"
    with good.open("w") as f:
        f.write("a,b,c,label\n")
        for row, label in zip(x, y, strict=True):
            f.write(",".join(f"{v:.5f}" for v in row) + f",{label}\n")
    code, out = _run(tmp_path, "--data", str(good), *FAST)
    assert code == 0
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] > 0.7

    ragged = tmp_path / "ragged.csv"
    ragged.write_text(good.read_text() + "1.0,2.0\n")
    code, _ = _run(tmp_path, "--data", str(ragged), *FAST, name="r2")
    assert code == 2
    err = capsys.readouterr().err
    assert "ragged.csv" in err


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    code, out = _run(tmp_path, *FAST)
    assert code == 0
    before = (out / "checkpoint.npz").read_bytes()
    code, _ = _run(tmp_path, *FAST)
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert (out / "checkpoint.npz").read_bytes() == before


def test_resume_continues_bit_identically(tmp_path):
    flags = ["--quiet", "--hidden", "16", "--keep-prob", "0.9", "--patience", "50"]
    flags += ["--check-every", "2"]  # kept by config.json, resumed with the run
    flags += ["--precision", "highest"]  # likewise (a mismatch fails the resume)
    code, full = _run(tmp_path, *flags, "--epochs", "6", name="full")
    assert code == 0
    code, part = _run(tmp_path, *flags, "--epochs", "2", name="part")
    assert code == 0
    assert main(["train", "--resume", str(part), "--epochs", "6", "--quiet"]) == 0
    a = _ckpt_leaves(full / "checkpoint.npz")
    b = _ckpt_leaves(part / "checkpoint.npz")
    for name in a:
        if "state" in name or "best_params" in name:
            np.testing.assert_array_equal(a[name], b[name])
    ma = json.loads((full / "metrics.json").read_text())
    mb = json.loads((part / "metrics.json").read_text())
    assert ma["test_accuracy"] == mb["test_accuracy"] and mb["epochs_run"] == 6
    assert mb["grad_check_epochs"] == [2, 4, 6]
    assert ma["grad_check_max_rel_err"] == mb["grad_check_max_rel_err"]
    assert ckpt.load_meta(part / "checkpoint.npz")["net"]["precision"] == "highest"
    assert load_run(part).net.precision == "highest"  # used as trained
    # The same columns in the same order, and the same values.
    history = (full / "history.csv").read_text()
    assert (part / "history.csv").read_text() == history


def test_grad_auto_trains_with_jax_grad(tmp_path):
    # BAD_SWISH has swish's h with a wrong h': the hand gradient is wrong and
    # jax.grad (which differentiates h) is right. So --grad auto must train
    # BAD_SWISH exactly as it trains SWISH, and --grad hand must not.
    common = ["--data", "iris", "--hidden", "6", "--epochs", "3", "--quiet"]
    common += ["--dtype", "float64", "--optimizer", "sgd", "--lr", "0.5"]
    runs = {
        (act, grad): _run(
            tmp_path,
            *common,
            "--activation",
            f"extensions:{act}",
            "--grad",
            grad,
            name=f"{act}-{grad}",
        )
        for act, grad in [
            ("BAD_SWISH", "auto"),
            ("SWISH", "auto"),
            ("BAD_SWISH", "hand"),
        ]
    }
    assert all(code == 0 for code, _ in runs.values())

    def params(key):
        leaves = _ckpt_leaves(runs[key][1] / "checkpoint.npz")
        return [leaves[k] for k in sorted(leaves) if "best_params" in k]

    auto_bad, auto_good = params(("BAD_SWISH", "auto")), params(("SWISH", "auto"))
    hand_bad = params(("BAD_SWISH", "hand"))
    assert len(auto_bad) == 4
    for u, v in zip(auto_bad, auto_good, strict=True):
        np.testing.assert_array_equal(u, v)
    assert any(not np.allclose(u, v) for u, v in zip(auto_bad, hand_bad, strict=True))


def test_training_flags_reach_fit(tmp_path, monkeypatch):
    from fnnet import cli
    from fnnet.train import TrainConfig

    seen = {}
    real_fit = cli.fit

    def spy(net, params, train, val, config, **kwargs):
        seen.update(net=net, config=config, kwargs=kwargs)
        return real_fit(net, params, train, val, config, **kwargs)

    monkeypatch.setattr(cli, "fit", spy)
    flags = ["--data", "iris", "--hidden", "5", "--epochs", "1", "--quiet"]
    flags += ["--batch-size", "7", "--lr", "0.03", "--optimizer", "nesterov"]
    flags += ["--momentum", "0.5", "--l2", "0.01", "--weight-decay", "0.02"]
    flags += ["--decay-biases", "--noise-std", "0.1", "--patience", "4"]
    flags += ["--seed", "9", "--grad", "auto", "--keep-prob", "0.8"]
    flags += ["--check-every", "1", "--activation", "tanh", "--dtype", "float64"]
    code, _ = _run(tmp_path, *flags)
    assert code == 0
    assert seen["config"] == TrainConfig(
        epochs=1,
        batch_size=7,
        learning_rate=0.03,
        optimizer="nesterov",
        momentum=0.5,
        l2=0.01,
        weight_decay=0.02,
        decay_biases=True,
        noise_std=0.1,
        patience=4,
        grad="auto",
        seed=9,
    )
    net = seen["net"]
    assert net.sizes[1:-1] == (5,) and net.keep_prob == 0.8
    assert net.describe()["activation"] in ("tanh", ["tanh"])
    assert seen["kwargs"]["check_every"] == 1


def test_resume_of_a_folder_without_a_run_exits_2(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--quiet"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_killed_run_leaves_a_loadable_checkpoint_and_resumes(tmp_path):
    # A real process killed (SIGKILL) mid-run: the checkpoint on disk is the
    # last complete one, and --resume finishes the run.
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fnnet", "train", "--out", str(out), "--quiet"]
    cmd += ["--hidden", "16", "--epochs", "400", "--patience", "400"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    path = out / "checkpoint.npz"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and ckpt.load_meta(path)["epoch"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    meta = ckpt.load_meta(path)
    assert 3 <= meta["epoch"] < 400
    leaves = _ckpt_leaves(path)
    assert all(np.isfinite(v).all() for k, v in leaves.items() if v.dtype.kind == "f")
    assert (
        main(
            [
                "train",
                "--resume",
                str(out),
                "--epochs",
                str(meta["epoch"] + 2),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        json.loads((out / "metrics.json").read_text())["epochs_run"]
        == meta["epoch"] + 2
    )


def test_python_dash_m_entry_point(tmp_path):
    del tmp_path
    result = subprocess.run(
        [sys.executable, "-m", "fnnet", "train", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "--grad" in result.stdout


def test_float64_runs(tmp_path):
    with jax.enable_x64(False):  # a user's default: the command turns it on
        code, out = _run(tmp_path, "--dtype", "float64", *FAST)
    assert code == 0
    assert (
        json.loads((out / "metrics.json").read_text())["config"]["dtype"] == "float64"
    )


def test_gradcheck_command_prints_a_table(capsys):
    argv = ["gradcheck", "--sizes", "3,4", "2", "--activation", "gelu", "--batch", "5"]
    with jax.enable_x64(False):  # a user's default: the command turns it on
        assert main(argv) == 0
    text = capsys.readouterr().out
    assert "gradcheck (float64, " in text
    assert "hand-auto" in text and text.count(" full") == 4
    worst = text.strip().splitlines()[-1]
    assert worst.startswith("worst: hand-auto")
    assert float(worst.split()[2].rstrip(",")) < 1e-10


def test_gradcheck_bad_sizes_exit_2(capsys):
    assert main(["gradcheck", "--sizes", "3"]) == 2
    assert "sizes must list at least" in capsys.readouterr().err


def test_resume_before_the_first_checkpoint_starts_over(tmp_path):
    code, out = _run(tmp_path, *FAST)
    assert code == 0
    reference = _ckpt_leaves(out / "checkpoint.npz")
    (out / "checkpoint.npz").unlink()  # as if killed during epoch 1
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    again = _ckpt_leaves(out / "checkpoint.npz")
    for name, value in reference.items():
        if "state" in name:
            np.testing.assert_array_equal(value, again[name])


# ------------------------------------------------ verification during training


def test_check_every_writes_history_columns_and_metrics(tmp_path):
    code, out = _run(tmp_path, *FAST, "--check-every", "2")
    assert code == 0
    rows = list(csv.DictReader((out / "history.csv").open()))
    grad = ["grad_rel_err_layer1", "grad_rel_err_layer2", "grad_rel_err_max"]
    assert list(rows[0])[-3:] == grad  # after the loss and metric columns
    assert [r["grad_rel_err_max"] != "" for r in rows] == [False, True, False]
    errors = [float(rows[1][k]) for k in grad]
    assert max(errors) < 1e-4  # float32: hand and jax.grad agree to rounding
    m = json.loads((out / "metrics.json").read_text())
    assert m["grad_check_max_rel_err"] == errors[-1]
    assert m["grad_check_epochs"] == [2]
    assert m["config"]["check_every"] == 2


@pytest.mark.parametrize("value", ["0", "-3", "two", "1.5"])
def test_bad_check_every_exits_2(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, "--quiet", "--check-every", value)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --check-every: must be a positive int" in err


# ------------------------------------------------ user extensions by import spec

SWISH_MODULE = """
    import jax

    import fnnet

    swish = fnnet.Activation(
        "swish",
        lambda a: a * jax.nn.sigmoid(a),
        lambda a: jax.nn.sigmoid(a) * (1 + a * jax.nn.sigmoid(-a)),
    )
    not_an_activation = len
"""


def _user_module(folder, name):
    (folder / f"{name}.py").write_text(textwrap.dedent(SWISH_MODULE))


@pytest.fixture
def forget_user_modules():
    """Drop the modules a test imported from its tmp_path."""
    yield
    for name in [n for n in sys.modules if n.startswith("fnnet_user_")]:
        del sys.modules[name]


def test_activation_from_an_import_spec_trains_and_resumes(
    tmp_path, monkeypatch, forget_user_modules
):
    _user_module(tmp_path, "fnnet_user_swish")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = "fnnet_user_swish:swish"
    flags = ["--data", "iris", "--activation", spec, "--hidden", "8", "--quiet"]
    code, out = _run(tmp_path, *flags, "--epochs", "2", "--dtype", "float64")
    assert code == 0
    assert json.loads((out / "config.json").read_text())["activation"] == spec
    meta = ckpt.load_meta(out / "checkpoint.npz")
    assert meta["net"]["activation"] == "swish"  # the extension's name...
    assert meta["info"]["settings"]["activation"] == spec  # ...and its spec
    # --resume imports the same object again and continues the run.
    assert main(["train", "--resume", str(out), "--epochs", "3", "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == 3 and m["config"]["activation"] == spec


@pytest.mark.parametrize(
    ("flag", "spec", "message"),
    [
        ("--activation", "fnnet_no_such_module:swish", "cannot import module"),
        ("--activation", "fnnet_user_bad:missing", "has no attribute 'missing'"),
        ("--activation", "fnnet_user_bad:not_an_activation", "not an fnnet"),
        ("--output", "fnnet_user_bad:not_an_activation", "not an fnnet.Activation"),
        (
            "--loss",
            "fnnet_user_bad:swish",
            "swish is of type Activation, not an fnnet.Loss",
        ),
        ("--loss", "fnnet_user_bad:", "an import spec is package.module:attribute"),
        ("--output", "softmaxx", "--output 'softmaxx' is not supported"),
    ],
)
def test_bad_import_spec_exits_2(
    tmp_path, capsys, monkeypatch, forget_user_modules, flag, spec, message
):
    # The current directory is importable: the module is found there.
    _user_module(tmp_path, "fnnet_user_bad")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # undo the cwd insertion
    code, _ = _run(tmp_path, "--quiet", flag, spec)
    assert code == 2
    err = capsys.readouterr().err
    assert f"fnnet train: error: {flag} {spec!r}" in err
    assert message in err


def _commands() -> dict:
    """Every subcommand's parser, by name."""
    parser = build_parser()
    sub = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub[0].choices)


def test_every_flag_of_every_command_has_help_showing_its_default_once():
    commands = _commands()
    assert {"train", "gradcheck"} <= set(commands)
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help, f"fnnet {name} {action.option_strings}: no help"
        text = parser.format_help()
        assert "(default: None)" not in text
        for entry in re.split(r"\n(?=  -)", text)[1:]:  # one entry per flag
            assert entry.count("(default") <= 1, f"fnnet {name}:\n{entry}"
        # --dtype says that the command turns 64-bit mode on itself.
        if "--dtype" in text:
            assert "float64 turns on JAX's 64-bit mode" in " ".join(text.split())


def test_list_flags_take_commas_spaces_or_both():
    parse = build_parser().parse_args
    for argv, dest, value in [
        (["gradcheck", "--sizes", "20,32,5"], "sizes", [20, 32, 5]),
        (["gradcheck", "--sizes", "20", "32", "5"], "sizes", [20, 32, 5]),
        (["gradcheck", "--sizes", "20,32", "5"], "sizes", [20, 32, 5]),
        (["gradcheck"], "sizes", [64, 32, 10]),
        (["gradcheck", "--activation", "tanh", "gelu"], "activation", "tanh,gelu"),
        (["train", "--hidden", "64,64"], "hidden", [64, 64]),
        (["train", "--hidden", "64", "64"], "hidden", [64, 64]),
        (["train", "--hidden"], "hidden", []),
        (["train"], "hidden", [128]),
        (["train", "--activation", "relu,tanh"], "activation", "relu,tanh"),
        (["train", "--activation", "relu", "tanh"], "activation", "relu,tanh"),
    ]:
        assert getattr(parse(argv), dest) == value, argv


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gradcheck", "--sizes", "a,b"], "positive integers, got 'a,b'"),
        (["gradcheck", "--sizes", "3", "0"], "positive integers, got '0'"),
        (["train", "--hidden", "-4"], "positive integers, got '-4'"),
        (["train", "--hidden", "64,,64"], "positive integers, got '64,,64'"),
        (["train", "--activation", "relu,,tanh"], "names, got 'relu,,tanh'"),
    ],
)
def test_bad_list_flags_exit_2_naming_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    flag = argv[1]
    expected = f"fnnet {argv[0]}: error: argument {flag}: expected comma-separated "
    assert expected + message in capsys.readouterr().err


def test_train_defaults_are_train_configs(tmp_path, monkeypatch):
    # fnnet train with no flags hands fit() exactly TrainConfig().
    class Stop(Exception):
        pass

    seen = {}

    def fake_fit(net, params, train, val, config, **kwargs):
        seen["config"] = config
        raise Stop

    monkeypatch.setattr(cli, "fit", fake_fit)
    with pytest.raises(Stop):
        main(["train", "--out", str(tmp_path / "run"), "--quiet"])
    assert seen["config"] == TrainConfig()
