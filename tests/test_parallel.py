"""Many devices (data parallelism) and many models (vmap over parameter sets)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet
from fnnet import ensemble, train
from fnnet.core import prepare
from fnnet.train import TrainConfig, batch_sharding

# Runs in a fresh process: XLA_FLAGS must be set before JAX starts.
DATA_PARALLEL = textwrap.dedent(
    """
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    import fnnet
    from fnnet import train
    from fnnet.core import prepare
    from fnnet.train import TrainConfig, fit

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 10))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    net = fnnet.MLP((10, 32, 2), "tanh", "softmax", "cross_entropy", keep_prob=0.9)
    out = {"devices": len(jax.devices())}
    for dtype in ("float64", "float32"):
        p = net.init(jax.random.key(0), jnp.dtype(dtype))
        cfg = TrainConfig(epochs=4, batch_size=64, optimizer="adam",
                          learning_rate=0.01, noise_std=0.1, patience=None)
        one = fit(net, p, (x, y), (x[:64], y[:64]), cfg)
        many = fit(net, p, (x, y), (x[:64], y[:64]), cfg, devices=8)
        diffs = [float(jnp.max(jnp.abs(u - v))) for u, v in
                 zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params))]
        out[dtype] = max(diffs)
        out[dtype + "_specs"] = sorted({str(v.sharding.spec)
                                        for v in jax.tree.leaves(many.params)})
    sh = train.batch_sharding(8)
    X, Y = prepare(net, p, x, y)
    opt = train.make_optimizer(cfg)
    state = train.init_state(p, opt)
    hlo = train.run_epoch_jit.lower(net, cfg.step_part(), opt, state, X, Y,
                                     jax.random.key(0), sharding=sh).compile().as_text()
    out["all_reduce"] = "all-reduce" in hlo
    out["per_device_rows"] = "f32[8,10]" in hlo   # 64 rows / 8 devices
    try:
        fit(net, p, (x, y), None, TrainConfig(batch_size=60, patience=None),
            devices=8)
    except ValueError as err:
        out["uneven"] = str(err)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", DATA_PARALLEL],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_data_parallel_matches_one_device(eight_devices):
    assert eight_devices["devices"] == 8
    assert eight_devices["float64"] < 1e-12
    assert eight_devices["float32"] < 1e-5
    assert eight_devices["float64_specs"] in (["P()"], ["PartitionSpec()"])


def test_data_parallel_shards_the_batch_and_xla_reduces(eight_devices):
    assert eight_devices["all_reduce"]
    assert eight_devices["per_device_rows"]
    assert "does not split evenly over 8 devices" in eight_devices["uneven"]


def test_cli_devices_flag_in_eight_device_process(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    out = tmp_path / "dp"
    cmd = [sys.executable, "-m", "fnnet", "train", "--devices", "8", "--quiet"]
    cmd += ["--hidden", "16", "--epochs", "2", "--out", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["device"] == "cpu x8"


def test_too_many_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="devices must be between 1 and"):
        batch_sharding(len(jax.devices()) + 1)


# ------------------------------------------------------------------ ensembles

NET = fnnet.MLP((4, 8, 3), activation="tanh", output="softmax", loss="cross_entropy")


def _blobs(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = 2.0 * np.eye(4)[y] + 0.7 * rng.standard_normal((n, 4))
    return x.astype(np.float32), y


def test_ensemble_member_equals_its_single_run():
    # Member k of the vmapped run is the run fit() does with member k's
    # parameters and random stream (no validation, no early stopping).
    x, y = _blobs(96, 0)
    cfg = TrainConfig(epochs=3, batch_size=16, learning_rate=0.1, optimizer="sgd")
    params = ensemble.init_many(NET, jax.random.key(0), 4)
    many = ensemble.fit_many(NET, params, (x, y), cfg)
    member_keys = ensemble.member_keys_for(cfg.seed, 4)
    for k in (0, 3):
        p = jax.tree.map(lambda leaf, k=k: leaf[k], params)
        single = _fit_with_key(p, x, y, cfg, member_keys[k])
        for u, v in zip(
            jax.tree.leaves(single), jax.tree.leaves(many.params), strict=True
        ):
            np.testing.assert_allclose(u, v[k], rtol=1e-5, atol=1e-6)


def _fit_with_key(params, x, y, cfg, base_key):
    X, Y = prepare(NET, params, x, y)
    state = train.init_state(params, None)
    for epoch in range(1, cfg.epochs + 1):
        key = train.epoch_key(base_key, epoch)
        state, _, _ = train.run_epoch_jit(NET, cfg.step_part(), None, state, X, Y, key)
    return state.params


def test_bootstrap_members_differ_and_the_average_predicts():
    x, y = _blobs(120, 1)
    x_te, y_te = _blobs(60, 2)
    cfg = TrainConfig(epochs=10, batch_size=16, learning_rate=0.1, optimizer="sgd")
    params = ensemble.init_many(NET, jax.random.key(1), 5)
    result = ensemble.fit_many(NET, params, (x, y), cfg, bootstrap=True)
    W = result.params[0]["W"]
    assert W.shape == (5, 8, 4)
    assert not np.allclose(W[0], W[1])
    scores = ensemble.evaluate(NET, result.params, x_te, y_te)
    assert scores["ensemble_accuracy"] > 0.85
    assert len(scores["member_accuracy"]) == 5
    yhat = ensemble.predict(NET, result.params, x_te)
    assert yhat.shape == (60, 3) and yhat.dtype == jnp.float32
    np.testing.assert_allclose(np.sum(yhat, axis=1), 1.0, rtol=1e-5)


def test_ensemble_epochs_do_not_retrace():
    x, y = _blobs(64, 3)
    cfg = TrainConfig(epochs=2, batch_size=16)
    params = ensemble.init_many(NET, jax.random.key(2), 3)
    ensemble.fit_many(NET, params, (x, y), cfg)
    size = ensemble.run_epoch_many._cache_size()
    ensemble.fit_many(NET, params, (x, y), TrainConfig(epochs=5, batch_size=16))
    assert ensemble.run_epoch_many._cache_size() == size
