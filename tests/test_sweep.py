"""Sweeps: a vmapped population of runs equals the same runs one by one."""

import csv
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet
from fnnet import sweep as fsweep
from fnnet.train import TrainConfig, fit

NET = fnnet.MLP((4, 6, 3), activation="tanh", output="softmax", loss="cross_entropy")


def _blobs(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = 1.5 * np.eye(4)[y] + 0.8 * rng.standard_normal((n, 4))
    return x, y


TRAIN, VAL = _blobs(64, 0), _blobs(32, 1)
# Adam, early stopping with a short patience, every swept setting in play.
CONFIG = TrainConfig(
    epochs=12, batch_size=16, optimizer="adam", learning_rate=0.05, patience=2
)
SETTINGS = {
    "seeds": [0, 3],
    "learning_rate": [0.02, 0.3],
    "l2": [0.0, 1e-2],
    "weight_decay": [0.0, 1e-2],
    "keep_prob": [1.0, 0.7],
    "noise_std": [0.0, 0.3],
}


@pytest.fixture(scope="module")
def result():
    # float64 (the suite enables x64); 64 members, 3 epochs per call. Its
    # compilation is most of this file's time: one test uses it, so that
    # pytest-xdist never builds it in two workers.
    return fsweep.fit_sweep(
        NET, TRAIN, VAL, CONFIG, dtype=jnp.float64, epochs_per_call=3, **SETTINGS
    )


def test_population_equals_single_runs_stops_per_member_and_summarises(result):
    _members_equal_their_single_runs(result)
    _each_member_stops_on_its_own(result)
    _summary_rows_average_over_seeds(result)


def _members_equal_their_single_runs(result):
    members = result.members
    assert len(members) == 2**6
    # The all-zero member (no penalty, decay, dropout or noise) and the
    # all-on member with the other seed: each equals fit() run alone.
    picks = [0, len(members) - 1]
    assert members[0] == {
        "seed": 0,
        "learning_rate": 0.02,
        "l2": 0.0,
        "weight_decay": 0.0,
        "keep_prob": 1.0,
        "noise_std": 0.0,
    }
    assert members[-1]["seed"] == 3 and members[-1]["keep_prob"] == 0.7
    for m in picks:
        net, config = fsweep.single_run_settings(NET, CONFIG, members[m])
        params = net.init(jax.random.key(members[m]["seed"]), jnp.float64)
        single = fit(net, params, TRAIN, VAL, config)
        assert result.epochs_run[m] == single.epochs_run
        assert result.best_epoch[m] == single.best_epoch
        assert result.stopped[m] == single.stopped
        for u, v in zip(
            jax.tree.leaves(single.params), jax.tree.leaves(result.params), strict=True
        ):
            np.testing.assert_allclose(v[m], u, rtol=1e-12, atol=1e-14)
        curve = [r["val_loss"] for r in single.history]
        np.testing.assert_allclose(
            result.val_loss[m, : single.epochs_run], curve, rtol=1e-12
        )
        assert np.all(np.isnan(result.val_loss[m, single.epochs_run :]))


def _each_member_stops_on_its_own(result):
    # Early stopping is per member: some stop before the last epoch, at
    # different epochs, while others run on; a stopped member keeps its best.
    runs = set(result.epochs_run.tolist())
    assert len(runs) > 1 and min(runs) < CONFIG.epochs
    assert "early_stopping" in result.stopped
    loss, _ = result.best_values()
    for m in range(len(result.members)):
        run = result.val_loss[m, : result.epochs_run[m]]
        assert loss[m] == np.min(run)


def _summary_rows_average_over_seeds(result):
    rows = fsweep.summary(result)
    assert len(rows) == 2**5 and all(r["seeds"] == 2 for r in rows)
    loss, _ = result.best_values()
    row = rows[5]
    np.testing.assert_allclose(row["val_loss_mean"], np.mean(loss[row["members"]]))
    np.testing.assert_allclose(row["val_loss_std"], np.std(loss[row["members"]]))
    best = fsweep.best_row(rows)
    assert best["val_loss_mean"] == min(r["val_loss_mean"] for r in rows)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learning_rate": []}, "learning_rate must be a non-empty sequence"),
        ({"l2": [-1.0]}, "l2 must be finite and >= 0"),
        ({"keep_prob": [0.0]}, r"keep_prob must be a float in \(0, 1\]"),
        ({"seeds": [0, -1]}, "seeds must be ints >= 0"),
        ({"noise_std": ["a"]}, "noise_std values must be numbers"),
    ],
)
def test_bad_settings_are_rejected_before_training(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fsweep.fit_sweep(NET, TRAIN, VAL, CONFIG, **kwargs)


def test_cli_sweep_writes_the_table_the_plot_and_the_best(tmp_path, capsys):
    from fnnet.cli import main

    out = tmp_path / "sweep"
    # One group (each --hidden value is a group: one compile each), 2 epochs.
    argv = ["sweep", "--data", "iris", "--hidden", "3", "--epochs", "2"]
    argv += ["--lr", "0.01,0.1", "--seeds", "0-1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "best: --hidden" in printed and "test_accuracy=" in printed
    rows = list(csv.DictReader((out / "results.csv").open()))
    # 2 learning rates, each over 2 seeds.
    assert [r["hidden"] for r in rows] == ["3"] * 2
    assert all(r["seeds"] == "2" for r in rows)
    members = list(csv.DictReader((out / "members.csv").open()))
    assert len(members) == 4 and {m["seed"] for m in members} == {"0", "1"}
    md = (out / "results.md").read_text()
    assert md.startswith("| hidden | lr | l2 |") and "±" in md
    best = json.loads((out / "best.json").read_text())
    assert len(best["test_accuracy_per_seed"]) == 2
    assert 0 <= best["test_accuracy_mean"] <= 1
    means = [float(r["val_loss_mean"]) for r in rows]
    assert best["val_loss_mean"] == pytest.approx(min(means))
    assert (out / "val_curves.png").stat().st_size > 0


def test_cli_sweep_reads_hidden_as_train_does_and_groups_per_flag():
    from fnnet.cli import build_parser

    def hidden(*flags):
        return build_parser().parse_args(["sweep", *flags]).hidden

    assert hidden() is None  # the sweep's default: [[128]]
    assert hidden("--hidden", "64", "64") == [[64, 64]]  # two layers, as in train
    assert hidden("--hidden", "64,64") == [[64, 64]]
    assert hidden("--hidden", "4", "--hidden", "3,3", "--hidden") == [[4], [3, 3], []]


def test_cli_sweep_bad_hidden_exits_2_naming_the_flag(capsys):
    from fnnet.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--hidden", "4", "--hidden", "4,0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --hidden: expected comma-separated positive integers" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "1e-3,x"], "--lr takes a comma list of numbers"),
        (["--seeds", "3-1"], "--seeds takes a range A-B"),
        (["--keep-prob", "0"], r"keep_prob must be a float in \(0, 1\]"),
    ],
)
def test_cli_sweep_bad_values_exit_2(tmp_path, capsys, flags, message):
    from fnnet.cli import main

    code = main(["sweep", "--data", "iris", "--out", str(tmp_path / "s"), *flags])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
