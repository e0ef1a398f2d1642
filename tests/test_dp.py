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
from fnnet.train import TrainConfig, fit

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


DP = TrainConfig(
    epochs=2, batch_size=8, learning_rate=0.3, dp_clip=0.5, dp_noise=1.1, dp_delta=1e-3
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


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory):
    X, Y = data()
    tmp = tmp_path_factory.mktemp("dp")
    full = fit(NET, params(), (X, Y), config=DP, log_noise_scale=True)
    again = fit(NET, params(), (X, Y), config=DP, log_noise_scale=True)
    fit(
        NET,
        params(),
        (X, Y),
        config=dataclasses.replace(DP, epochs=1),
        checkpoint=tmp / "c.npz",
        log_noise_scale=True,
    )
    resumed = fit(
        NET,
        params(),
        (X, Y),
        config=DP,
        checkpoint=tmp / "c.npz",
        resume=True,
        log_noise_scale=True,
    )
    quiet = fit(NET, params(), (X, Y), config=dataclasses.replace(DP, dp_noise=0.0))
    other = fit(NET, params(), (X, Y), config=dataclasses.replace(DP, seed=1))
    return full, again, resumed, quiet, other


def test_noisy_runs_are_reproducible_and_resume_bit_identically(dp_runs):
    full, again, resumed, quiet, other = dp_runs
    for run in (again, resumed):
        for a, b in zip(
            jax.tree.leaves(full.params), jax.tree.leaves(run.params), strict=True
        ):
            np.testing.assert_array_equal(a, b)
        assert run.history == full.history
    # The noise is there, and it comes from the run's key (config.seed).
    differ = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(full.params), jax.tree.leaves(quiet.params), strict=True
        )
    ]
    assert all(differ)
    assert not np.array_equal(full.params[0]["W"], other.params[0]["W"])


def test_history_reports_the_epsilon_spent(dp_runs):
    full, *_, quiet, _ = dp_runs
    q, steps = B_N = (8 / N, N // 8)
    assert B_N == privacy.poisson_schedule(N, 8)
    eps = [r["dp_epsilon"] for r in full.history]
    assert eps == [privacy.epsilon(1.1, q, steps * e, 1e-3) for e in (1, 2)]
    assert 0 < eps[0] < eps[1]
    assert "dp_epsilon" not in quiet.history[-1]  # no noise: no finite epsilon


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


def test_noise_scale_in_the_history(dp_runs):
    full = dp_runs[0]
    for r in full.history:
        assert r["noise_scale"] == pytest.approx(r["noise_trace"] / r["noise_grad_sq"])
        assert r["noise_trace"] > 0


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


def test_cli_dp_run_reports_epsilon_and_resumes(tmp_path, capsys):
    out = tmp_path / "dp"
    flags = ["--quiet", "--hidden", "8", "--batch-size", "64", "--lr", "0.01"]
    dp = ["--dp-clip", "1", "--dp-noise", "1.0", "--log-noise-scale"]
    assert main(["train", "--out", str(out), *flags, "--epochs", "2", *dp]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "3", "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert m["dp"]["delta"] == 1e-5 and m["dp"]["sampling"] == "poisson"
    q, steps = m["dp"]["sample_rate"], m["dp"]["steps"]
    assert m["dp_epsilon"] == privacy.epsilon(1.0, q, steps, 1e-5)
    assert float(rows[-1]["dp_epsilon"]) == pytest.approx(m["dp_epsilon"])
    assert all(float(r["noise_scale"]) != 0 for r in rows)
    # Bad flags speak the user's language and exit 2.
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "x"), "--dp-noise", "1"]) == 2
    assert "--dp-noise 1.0 needs --dp-clip C" in capsys.readouterr().err
    bad = ["--dp-clip", "1", "--grad", "auto"]
    assert main(["train", "--out", str(tmp_path / "y"), *bad]) == 2
    assert "--dp-clip needs --grad hand" in capsys.readouterr().err
