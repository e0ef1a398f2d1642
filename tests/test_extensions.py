"""User extensions through the public API: activations, losses and blocks.

Each extension (tests/extensions.py) is written as a user would write it; the
deliberately wrong ones must be caught by fnnet.verify, by name and input.
Networks built with the right ones get what the built-ins get: jit as a
static argument, vmap per-example gradients, the custom_vjp integration,
gradcheck and training with fit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from extensions import (
    BAD_HUBER,
    BAD_LAYER_NORM,
    BAD_RESIDUAL,
    BAD_SWISH,
    HUBER,
    HUBER_NO_TARGET_GRAD,
    LAYER_NORM,
    RESIDUAL,
    SWISH,
)
from references import central_differences, max_rel_error

import fnnet
from fnnet.blocks import serial
from fnnet.train import TrainConfig, fit

LN_RELU = serial("ln_relu", LAYER_NORM, fnnet.ACTIVATIONS["relu"])


max_rel = max_rel_error  # the NumPy judge, not fnnet.relative_error


@pytest.mark.parametrize("ext", [SWISH, HUBER, LAYER_NORM, RESIDUAL, LN_RELU])
def test_right_derivatives_pass(ext):
    report = fnnet.verify(ext)
    assert report.passed, report.message
    assert report.vs_auto < 1e-12 and report.vs_fd < 1e-6
    assert "PASS" in str(report) and ext.name in str(report)
    assert report.raise_if_failed() is report


@pytest.mark.parametrize(
    ("ext", "where"),
    [
        (BAD_SWISH, r"activation 'bad_swish': FAIL.*disagree at a = -?\d"),
        (BAD_HUBER, r"loss 'bad_huber': FAIL.*disagree at yhat\[\d, \d\] = "),
        (BAD_LAYER_NORM, r"block 'bad_layer_norm': FAIL.*disagree at dx\["),
        (BAD_RESIDUAL, r"block 'bad_residual': FAIL.*disagree at dx\["),
    ],
)
def test_wrong_derivatives_are_caught_by_name_and_input(ext, where):
    report = fnnet.verify(ext)
    assert not report.passed
    assert report.vs_auto > 1e-2 and report.vs_fd > 1e-2  # both references agree
    with pytest.raises(ValueError, match=f"(?s){where}"):
        report.raise_if_failed()


def test_builtin_activations_pass_the_same_check():
    for act in fnnet.ACTIVATIONS.values():
        assert fnnet.verify(act).passed, act.name


def test_verify_a_network_checks_its_extensions_only():
    net = fnnet.MLP((3, 4, 4, 2), (SWISH, "tanh"), "identity", BAD_HUBER)
    reports = fnnet.verify(net)
    assert [r.name for r in reports] == ["swish", "bad_huber"]
    assert [r.passed for r in reports] == [True, False]
    with pytest.raises(TypeError, match="verify takes an fnnet.Activation"):
        fnnet.verify("swish")


# --- networks built with extensions ------------------------------------------

NET = fnnet.MLP((3, 6, 6, 2), (SWISH, RESIDUAL), SWISH, HUBER)
NET_LN = fnnet.MLP((4, 5, 3), LN_RELU, "softmax", "cross_entropy", keep_prob=0.8)


def _data(net, n, seed, labels=False):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = 2.0 * jax.random.normal(k1, (n, net.sizes[0]), jnp.float64)
    if labels:
        return x, jax.random.randint(k2, (n,), 0, net.sizes[-1])
    return x, 3.0 * jax.random.normal(k2, (n, net.sizes[-1]), jnp.float64)


def test_init_puts_block_parameters_under_the_block_name():
    params = NET.init(jax.random.key(0), jnp.float64)
    assert sorted(params[1]) == ["W", "b", "residual"]
    assert params[1]["residual"]["V"].shape == (6, 6)
    assert sorted(params[0]) == sorted(params[2]) == ["W", "b"]
    bad = (params[0], {"W": params[1]["W"], "b": params[1]["b"]}, params[2])
    with pytest.raises(ValueError, match=r"params\[1\] must be a dict with keys"):
        NET.backprop(bad, *_data(NET, 4, 1))
    wrong = jax.tree.map(lambda t: t, params)
    wrong[1]["residual"]["V"] = jnp.zeros((6, 5), jnp.float64)
    with pytest.raises(ValueError, match=r"params\[1\]\['residual'\]\['V'\] must"):
        NET.forward(wrong, _data(NET, 4, 1)[0])


@pytest.mark.parametrize("net", [NET, NET_LN], ids=["swish-residual-huber", "ln"])
def test_hand_gradients_equal_autodiff_and_finite_differences(net):
    params = net.init(jax.random.key(1), jnp.float64)
    x, y = _data(net, 7, 2, labels=net is NET_LN)
    J, grads = net.backprop(params, x, y)
    J2, auto = jax.value_and_grad(net.cost)(params, x, y)
    assert max_rel(grads, auto) < 1e-12
    np.testing.assert_allclose(J, J2, rtol=1e-15)
    fd = central_differences(lambda p: net.cost(p, x, y), params)
    assert max_rel(grads, fd) < 1e-6
    report = fnnet.gradcheck(net, params, x, y)  # ...which gradcheck reports too
    assert report.worst("hand_vs_auto") < 1e-12
    assert report.worst("hand_vs_fd") < 1e-6
    leaves = {(r.layer, r.leaf) for r in report.rows}
    block = "residual" if net is NET else "ln_relu"
    assert any(leaf.startswith(block) for _, leaf in leaves)


def test_dropout_per_example_and_custom_vjp_with_a_block():
    params = NET_LN.init(jax.random.key(3), jnp.float64)
    x, y = _data(NET_LN, 6, 4, labels=True)
    key = jax.random.key(5)
    _, grads = NET_LN.backprop(params, x, y, key=key)
    auto = jax.grad(NET_LN.cost)(params, x, y, key=key)
    assert max_rel(grads, auto) < 1e-12
    J_i, per = NET_LN.per_example_grads(params, x, y)
    mean = jax.tree.map(lambda t: jnp.mean(t, axis=0), per)
    assert max_rel(mean, NET_LN.backprop(params, x, y)[1]) < 1e-12
    assert J_i.shape == (6,)
    hand = jax.grad(NET_LN.hand_cost, argnums=(0, 1))(params, x, y, key=key)
    ref = jax.grad(NET_LN.cost, argnums=(0, 1))(params, x, y, key=key)
    assert max_rel(hand, ref) < 1e-12


def test_hand_cost_target_gradient_of_user_losses():
    params = NET.init(jax.random.key(6), jnp.float64)
    x, y = _data(NET, 5, 7)
    hand = jax.grad(NET.hand_cost, argnums=2)(params, x, y)
    np.testing.assert_allclose(hand, jax.grad(NET.cost, argnums=2)(params, x, y))
    # Without target_grad there is no hand dL/dy: NaN, never a silent zero.
    net = fnnet.MLP((3, 6, 6, 2), (SWISH, RESIDUAL), SWISH, HUBER_NO_TARGET_GRAD)
    dy = jax.grad(net.hand_cost, argnums=2)(params, x, y)
    assert np.all(np.isnan(dy))
    dparams = jax.grad(net.hand_cost)(params, x, y)  # params are unaffected
    assert max_rel(dparams, jax.grad(net.cost)(params, x, y)) < 1e-12


def test_extensions_are_static_arguments_without_retracing():
    traces = []

    @jax.jit
    def step(net_params, x, y):
        traces.append(1)
        return NET.backprop(net_params, x, y)[0]

    params = NET.init(jax.random.key(8), jnp.float64)
    x, y = _data(NET, 4, 9)
    step(params, x, y)
    step(jax.tree.map(lambda t: t + 0.1, params), x + 1.0, y)
    assert len(traces) == 1
    again = fnnet.MLP((3, 6, 6, 2), (SWISH, RESIDUAL), SWISH, HUBER)
    assert again == NET and hash(again) == hash(NET)
    assert NET.describe()["activation"] == ["swish", "residual"]


def test_fit_trains_a_network_with_extensions():
    x, y = _data(NET, 64, 10)
    y = jnp.tanh(x[:, :2])  # learnable
    params = NET.init(jax.random.key(11), jnp.float64)
    cfg = TrainConfig(epochs=30, batch_size=16, optimizer="adam", learning_rate=0.01)
    result = fit(NET, params, (x, y), (x, y), cfg)
    losses = [r["val_loss"] for r in result.history]
    assert losses[-1] < 0.5 * losses[0]


def test_bad_extensions_raise_clear_errors():
    with pytest.raises(TypeError, match="h_prime must be callable"):
        fnnet.Activation("x", jnp.tanh, None)
    with pytest.raises(ValueError, match="Block name 'W' clashes"):
        fnnet.Block("W", lambda p, x: (x, None), lambda p, c, d: (None, d))
    with pytest.raises(TypeError, match="activation must be a name, an fnnet"):
        fnnet.MLP((2, 3, 1), activation=42)
    with pytest.raises(TypeError, match="output must be a name or an fnnet.Activation"):
        fnnet.MLP((2, 3, 1), output=RESIDUAL)
    with pytest.raises(TypeError, match="loss must be a name or an fnnet.Loss"):
        fnnet.MLP((2, 3, 1), loss=SWISH)
    with pytest.raises(
        ValueError, match="loss='bce' needs output='sigmoid', got output='swish'"
    ):
        fnnet.MLP((2, 3, 1), output=SWISH, loss="bce")
