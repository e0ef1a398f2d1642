"""DP-SGD in training, its accounting, and the gradient noise scale."""

import csv
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet
from fnnet import core, privacy, train
from fnnet.cli import main
from fnnet.train import TrainConfig

NET = fnnet.MLP((4, 6, 3), activation="tanh", output="softmax", loss="cross_entropy")
N = 40


def data(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, 4)).astype(dtype)
    Y = (X[:, 0] > 0).astype(np.int32) + (X[:, 1] > 0.5).astype(np.int32)
    return X, Y


def params(dtype=jnp.float64):
    rng = np.random.default_rng(1)
    return tuple(
        {"W": jnp.asarray(rng.normal(size=(m, k)), dtype), "b": jnp.zeros(m, dtype)}
        for k, m in zip(NET.sizes[:-1], NET.sizes[1:], strict=True)
    )


def test_no_noise_and_no_clipping_is_plain_sgd_exactly():
    # One step on the same batch: (sum_i g_i + 0) / B with C = inf is the
    # batched hand gradient by the same operations, so the update is equal
    # bit for bit (same program, same platform).
    X, Y = data()
    x, y = core.prepare(NET, params(), X[:8], Y[:8])
    plain = TrainConfig(batch_size=8, learning_rate=0.3, l2=0.01)
    dp = dataclasses.replace(plain, dp_clip=float("inf"))
    state = train.init_state(params(), None)

    @jax.jit
    def steps(state, x, y):
        want, J = train.train_step(NET, plain, None, state, x, y)
        g, L = train.dp_batch_grads(NET, dp, state.params, x, y, jnp.ones(8), None, 8)
        g = train.l2_grad(state.params, g, dp)
        return want, J, train.apply_update(dp, None, state, g), L

    want, J, got, L = steps(state, x, y)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(L) / 8 + float(train.l2_penalty(state.params, plain)) == float(J)


def test_epsilon_is_the_accountants_own_figure():
    # The package's own figure for a known setting, computed here directly.
    import dp_accounting
    from dp_accounting import rdp

    q, steps, sigma, delta = 256 / 60000, 60 * (60000 // 256), 1.1, 1e-5
    acc = rdp.RdpAccountant()
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                q, dp_accounting.GaussianDpEvent(sigma)
            ),
            steps,
        )
    )
    want = acc.get_epsilon(delta)
    assert privacy.epsilon(sigma, q, steps, delta) == want
    # The classic MNIST setting (Abadi et al. 2016, as TF Privacy reports it
    # with RDP): epsilon about 3 at sigma 1.1, 60 epochs, batch 256.
    assert 2.5 < want < 3.5
    assert privacy.poisson_schedule(60000, 256) == (q, 60000 // 256)


FLAGS = ["--quiet", "--hidden", "8", "--batch-size", "64", "--lr", "0.01"]
DP_FLAGS = ["--dp-clip", "1", "--dp-noise", "1.1", "--log-noise-scale"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """fnnet train with DP-SGD: 2 epochs straight, and 1 epoch then resumed."""
    tmp = tmp_path_factory.mktemp("dp")
    full, part = tmp / "full", tmp / "part"
    assert main(["train", "--out", str(full), *FLAGS, "--epochs", "2", *DP_FLAGS]) == 0
    assert main(["train", "--out", str(part), *FLAGS, "--epochs", "1", *DP_FLAGS]) == 0
    assert main(["train", "--resume", str(part), "--epochs", "2", "--quiet"]) == 0
    return full, part


def read_run(out):
    m = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "history.csv").open()))
    with np.load(out / "checkpoint.npz", allow_pickle=False) as f:
        leaves = {k: f[k] for k in f.files}
    return m, rows, leaves


def test_noisy_run_resumes_bit_identically(cli_runs):
    # Everything random (batches, noise) comes from the run's key, so the run
    # that stopped after epoch 1 and resumed ends bit-identical to the other.
    (m_full, rows_full, full), (m_part, rows_part, part) = map(read_run, cli_runs)
    assert full.keys() == part.keys()
    for k in full:
        if k.startswith("meta") or full[k].dtype.kind not in "fc":
            continue
        np.testing.assert_array_equal(full[k], part[k], err_msg=k)
    assert rows_full == rows_part
    assert m_full["test_accuracy"] == m_part["test_accuracy"]


def test_noise_comes_from_the_key():
    g = ({"W": jnp.zeros((3, 2)), "b": jnp.zeros(3)},)
    cfg = TrainConfig(dp_clip=2.0, dp_noise=1.5)
    a = train.dp_noise(cfg, g, jax.random.key(0), 4)
    b = train.dp_noise(cfg, g, jax.random.key(0), 4)
    c = train.dp_noise(cfg, g, jax.random.key(1), 4)
    leaves = (jax.tree.leaves(t) for t in (a, b, c))
    for u, v, w in zip(*leaves, strict=True):
        np.testing.assert_array_equal(u, v)
        assert np.all(u != w) and np.all(u != 0)
    # std sigma C / B = 0.75 per coordinate, on 9 draws: loosely.
    draws = np.concatenate([np.ravel(t) for t in jax.tree.leaves(a)])
    assert 0.2 < draws.std() < 2.0
    off = train.dp_noise(TrainConfig(dp_clip=2.0), g, jax.random.key(0), 4)
    assert all(np.all(t == 0) for t in jax.tree.leaves(off))


def test_history_and_metrics_report_the_epsilon_spent(cli_runs):
    m, rows, _ = read_run(cli_runs[0])
    dp = m["dp"]
    assert dp["delta"] == 1e-5 and dp["sampling"] == "poisson"
    assert dp["noise_multiplier"] == 1.1 and dp["clip"] == 1.0
    n = round(64 / dp["sample_rate"])
    q, steps = privacy.poisson_schedule(n, 64)
    assert dp["steps"] == 2 * steps and q == dp["sample_rate"]
    eps = [float(r["dp_epsilon"]) for r in rows]
    want = [privacy.epsilon(1.1, q, e * steps, 1e-5) for e in (1, 2)]
    np.testing.assert_allclose(eps, want, rtol=1e-12)
    assert m["dp_epsilon"] == want[-1] and 0 < eps[0] < eps[1]


def test_noise_scale_in_the_history(cli_runs):
    _, rows, _ = read_run(cli_runs[0])
    for r in rows:
        scale, trace, g2 = (float(r[k]) for k in train.NOISE_SCALE_KEYS)
        assert scale == pytest.approx(trace / g2) and trace > 0


def test_noise_scale_estimates_are_the_sample_statistics():
    # tr(Sigma) estimate = the unbiased sample variance of the per-example
    # gradients, |G|^2 estimate = ||g_bar||^2 - tr(Sigma)/B (NumPy on vmap).
    X, Y = data()
    x, y = core.prepare(NET, params(), X[:10], Y[:10])

    @jax.jit
    def go(p, x, y):
        out = core.per_example_norms(NET, p, x, y)
        g = jax.vmap(lambda a, b: jax.grad(lambda q: core.cost(NET, q, a, b))(p))(x, y)
        return core.noise_scale_estimates(out.norms, out.grads), g

    (trace, grad_sq), g = go(params(), x, y)
    flat = np.concatenate(
        [np.asarray(t).reshape(10, -1) for t in jax.tree.leaves(g)], 1
    )
    mean = flat.mean(axis=0)
    want_trace = np.sum((flat - mean) ** 2) / 9
    np.testing.assert_allclose(trace, want_trace, rtol=1e-10)
    np.testing.assert_allclose(grad_sq, mean @ mean - want_trace / 10, rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dp_clip": 0.0}, "dp_clip must be > 0"),
        ({"dp_noise": 1.0}, "dp_noise=1.0 needs a finite dp_clip"),
        ({"dp_clip": float("inf"), "dp_noise": 1.0}, "needs a finite dp_clip"),
        ({"dp_clip": 1.0, "dp_delta": 1.0}, r"dp_delta must lie in \(0, 1\)"),
        ({"dp_delta": 1e-5}, "dp_delta needs dp_clip"),
        ({"dp_clip": 1.0, "grad": "auto"}, "dp_clip needs grad='hand'"),
        ({"dp_clip": 1.0, "dp_noise": -1.0}, "dp_noise must be finite and >= 0"),
    ],
)
def test_bad_dp_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_bad_dp_flags_exit_2_in_the_flags_words(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "x"), "--dp-noise", "1"]) == 2
    assert "--dp-noise 1.0 needs --dp-clip C" in capsys.readouterr().err
    bad = ["--dp-clip", "1", "--grad", "auto"]
    assert main(["train", "--out", str(tmp_path / "y"), *bad]) == 2
    assert "--dp-clip needs --grad hand" in capsys.readouterr().err
    bad = ["--dp-clip", "inf", "--dp-noise", "1"]
    assert main(["train", "--out", str(tmp_path / "z"), *bad]) == 2
    assert "needs a finite --dp-clip" in capsys.readouterr().err
