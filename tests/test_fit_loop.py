"""fit's loop: epochs per call, checkpoints when due and on interruption."""

import jax
import numpy as np
import pytest

import fnnet
from fnnet import checkpoint as ckpt
from fnnet.cli import checkpoint_every
from fnnet.train import TrainConfig, fit

NET = fnnet.MLP((4, 5, 3), activation="tanh", output="softmax", loss="cross_entropy")


def _blobs(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    return 1.5 * np.eye(4)[y] + 0.8 * rng.standard_normal((n, 4)), y


DATA = (_blobs(48, 0), _blobs(24, 1))
CONFIG = TrainConfig(epochs=25, batch_size=16, learning_rate=0.1, patience=30)


def _params():
    return NET.init(jax.random.key(0), np.float64)


def _assert_trees_equal(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_an_interrupted_run_saves_its_last_call_and_resumes_bit_identically(
    tmp_path,
):
    full = fit(NET, _params(), *DATA, CONFIG)
    path = tmp_path / "run.npz"

    def interrupt(record):
        if record["epoch"] == 11:  # during the second call's records (11-20)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(
            NET,
            _params(),
            *DATA,
            CONFIG,
            checkpoint=path,
            checkpoint_every=100,  # not due again after the first call (10)
            on_epoch=interrupt,
        )
    # Written on the way out, with the last complete call.
    assert ckpt.load_meta(path)["epoch"] == 20
    resumed = fit(NET, _params(), *DATA, CONFIG, checkpoint=path, resume=True)
    _assert_trees_equal(resumed.state, full.state)
    _assert_trees_equal(resumed.params, full.params)
    assert resumed.history == full.history and resumed.best_epoch == full.best_epoch


def test_checkpoint_every_flag_reads_epochs_or_seconds():
    assert checkpoint_every("10") == (10, None)
    assert checkpoint_every("30s") == (None, 30.0)
    assert checkpoint_every("0.5s") == (None, 0.5)
    for bad in ("0", "-3", "s", "10m", "infs", "x"):
        with pytest.raises(ValueError, match="--checkpoint-every must be"):
            checkpoint_every(bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs_per_call": 0}, "epochs_per_call must be a positive int, got 0"),
        ({"checkpoint_every": 1.5}, "checkpoint_every must be a positive int"),
        ({"checkpoint_seconds": -1}, "checkpoint_seconds must be a number >= 0"),
        ({"checkpoint_every": 2, "checkpoint_seconds": 1.0}, "not both"),
    ],
)
def test_bad_loop_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(NET, _params(), *DATA, CONFIG, **kwargs)
