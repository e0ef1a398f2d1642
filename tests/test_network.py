"""Tests for fnnet.network (and fnnet.backward): the MLP's public contract.

Oracles: a plain forward written here with jax.nn functions, jax.grad of
``net.cost`` (pure autodiff) and one 2-2-1 example worked out by hand.
"""

import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from references import REFERENCE_H, max_rel_error, rel_error

import fnnet
from fnnet import backward as bw
from fnnet import core, ensemble, network
from fnnet.activations import HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS


def f64(value):
    array = jnp.asarray(value, jnp.float64)
    assert array.dtype == jnp.float64
    return array


def leaves(tree):
    return jax.tree.leaves(tree)


def assert_trees_close(u, v, rtol, atol=0.0):
    assert jax.tree.structure(u) == jax.tree.structure(v)
    for a, b in zip(leaves(u), leaves(v), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


max_rel = max_rel_error  # the NumPy judge, not fnnet.relative_error


# The example network, shared by the tests below (compiled once).
CONTRACT = fnnet.MLP(
    sizes=(64, 128, 10), activation="relu", output="softmax", loss="cross_entropy"
)


@pytest.fixture(scope="module")
def contract():
    """(params64, x (8, 64), labels (8,)) for CONTRACT."""
    params = CONTRACT.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (8, 64), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (8,), 0, 10)
    return params, x, y


# --- init, shapes, configuration ---------------------------------------------


def test_contract_init_and_shapes(contract):
    params = CONTRACT.init(jax.random.key(0))
    assert isinstance(params, tuple) and len(params) == 2
    for layer, (m_in, m_out) in zip(params, [(64, 128), (128, 10)], strict=True):
        assert set(layer) == {"W", "b"}
        assert layer["W"].shape == (m_out, m_in) and layer["b"].shape == (m_out,)
        assert layer["W"].dtype == layer["b"].dtype == jnp.float32  # the default
        np.testing.assert_array_equal(layer["b"], 0.0)
    params64, x, y = contract
    assert CONTRACT.forward(params64, x[0]).shape == (10,)
    assert CONTRACT.forward(params64, x).shape == (8, 10)
    J = CONTRACT.cost(params64, x, y)
    assert J.shape == () and J.dtype == jnp.float64
    J, grads = CONTRACT.backprop(params64, x, y)
    assert jax.tree.structure(grads) == jax.tree.structure(params64)
    for g, p in zip(leaves(grads), leaves(params64), strict=True):
        assert g.shape == p.shape and g.dtype == jnp.float64


def test_init_deterministic_and_scaled():
    net = fnnet.MLP((400, 300, 200), activation="relu", output="tanh")
    p1 = net.init(jax.random.key(7), jnp.float64)
    p2 = net.init(jax.random.key(7), jnp.float64)
    p3 = net.init(jax.random.key(8), jnp.float64)
    for a, b in zip(leaves(p1), leaves(p2), strict=True):
        np.testing.assert_array_equal(a, b)  # bit-identical
    assert not np.array_equal(p1[0]["W"], p3[0]["W"])
    # He for the relu layer (var 2 / fan_in), LeCun for the output (1 / fan_in):
    # 120k and 60k draws, the sample std is within 1% of the target.
    np.testing.assert_allclose(np.std(p1[0]["W"]), np.sqrt(2 / 400), rtol=0.01)
    np.testing.assert_allclose(np.std(p1[1]["W"]), np.sqrt(1 / 300), rtol=0.01)
    with pytest.raises(TypeError, match="dtype must be a floating dtype, got int32"):
        net.init(jax.random.key(0), jnp.int32)


def test_float64_without_x64_is_an_error_that_says_how_to_turn_it_on():
    net = fnnet.MLP((3, 4, 2))
    key = jax.random.key(0)
    how = r'jax\.config\.update\("jax_enable_x64", True\).*JAX_ENABLE_X64=1'
    with jax.enable_x64(False):  # a user's default: 64-bit mode off
        with pytest.raises(
            ValueError, match=r"dtype=float64 needs JAX's 64-bit .*" + how
        ):
            net.init(key, jnp.float64)
        with pytest.raises(ValueError, match="dtype=float64 needs"):
            ensemble.init_many(net, key, 2, jnp.float64)
        # float64 parameters made with NumPy would run in float32 too: refused.
        as64 = [{"W": np.zeros((m, n)), "b": np.zeros(m)} for n, m in ((3, 4), (4, 2))]
        with pytest.raises(
            ValueError, match=r"params\[0\]\['W'\]\.dtype=float64 needs"
        ):
            net.forward(as64, np.zeros(3, np.float32))
    assert net.init(key, jnp.float64)[0]["W"].dtype == jnp.float64  # x64 on


def test_weight_init_is_the_activations_own_stated_choice():
    schemes = {name: act.weight_init for name, act in fnnet.ACTIVATIONS.items()}
    assert schemes == {
        "identity": "lecun",
        "sigmoid": "lecun",
        "tanh": "lecun",
        "relu": "he",
        "leaky_relu": "he",
        "softplus": "lecun",
        "elu": "he",
        "gelu": "he",
    }
    relu = fnnet.ACTIVATIONS["relu"]
    # A user's activation gets lecun unless it names a scheme, even when it is
    # called "relu": the scheme belongs to the object, not to its name.
    own_relu = fnnet.Activation("relu", relu.h, relu.h_prime)
    glorot = fnnet.Activation("g", relu.h, relu.h_prime, weight_init="glorot")
    block = fnnet.Block("blk", relu.forward, relu.backward, weight_init="he")
    assert (
        own_relu.weight_init == "lecun"
        and fnnet.Block("plain", relu.forward, relu.backward).weight_init == "lecun"
    )
    net = fnnet.MLP(
        (400, 300, 200, 150, 100), (own_relu, glorot, block), "softmax", "cross_entropy"
    )
    params = net.init(jax.random.key(9), jnp.float64)
    # Variances: lecun (own "relu"), glorot, he (the block), lecun (softmax).
    expected = [1 / 400, 2 / (300 + 200), 2 / 200, 1 / 150]
    # 15k to 120k draws each: the sample std is within 2% of the target.
    for layer, var in zip(params, expected, strict=True):
        np.testing.assert_allclose(np.std(layer["W"]), np.sqrt(var), rtol=0.02)
    for bad in (
        lambda: fnnet.Activation("x", relu.h, relu.h_prime, weight_init="xavier"),
        lambda: fnnet.Block("x", relu.forward, relu.backward, weight_init="xavier"),
    ):
        with pytest.raises(
            ValueError,
            match=r"weight_init must be one of \('lecun', 'he', 'glorot'\), "
            "got 'xavier'",
        ):
            bad()


def test_config_is_normalised_hashable_and_frozen():
    a = fnnet.MLP([3, 4, 4, 2], activation=["tanh", "relu"], keep_prob=1)
    b = fnnet.MLP((3, 4, 4, 2), activation=("tanh", "relu"), keep_prob=1.0)
    assert a.sizes == (3, 4, 4, 2) and a.activation == ("tanh", "relu")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.num_layers == 3 and a.hidden_activations == ("tanh", "relu")
    assert fnnet.MLP((3, 4, 4, 2), "gelu").hidden_activations == ("gelu", "gelu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.sizes = (1, 2)


def test_one_activation_name_equals_one_per_layer():
    shared = fnnet.MLP((3, 4, 5, 2), activation="elu")
    per_layer = fnnet.MLP((3, 4, 5, 2), activation=("elu", "elu"))
    params = shared.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
    np.testing.assert_array_equal(
        shared.forward(params, x), per_layer.forward(params, x)
    )


# --- forward against a plain jax.nn reference ---------------------------------


def reference_forward(hidden, output, params, x):
    """z^(l) = h(W z^(l-1) + b), one example at a time, with jax.nn functions."""

    def one(z):
        for layer, name in zip(params, (*hidden, output), strict=True):
            z = REFERENCE_H[name](layer["W"] @ z + layer["b"])
        return z

    return jax.vmap(one)(x) if x.ndim == 2 else one(x)


reference_forward = jax.jit(reference_forward, static_argnums=(0, 1))


@pytest.mark.parametrize("output", OUTPUT_ACTIVATIONS)
def test_forward_matches_reference(output):
    # Eight hidden layers, one per activation: every h in one network.
    net = fnnet.MLP(
        (5,) + (6,) * 8 + (3,), activation=HIDDEN_ACTIVATIONS, output=output
    )
    params = net.init(jax.random.key(3), jnp.float64)
    x = jax.random.normal(jax.random.key(4), (7, 5), jnp.float64)
    ours = net.forward(params, x)
    ref = reference_forward(HIDDEN_ACTIVATIONS, output, params, x)
    assert ours.dtype == jnp.float64 and ours.shape == (7, 3)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-14)
    if output in ("identity", "softmax"):  # one example (the per-example shapes)
        np.testing.assert_allclose(
            net.forward(params, x[2]), ref[2], rtol=1e-12, atol=1e-14
        )


# --- a hand-worked example ----------------------------------------------------


def test_hand_worked_2_2_1_example():
    net = fnnet.MLP((2, 2, 1), activation="relu", output="identity", loss="mse")
    params = (
        {"W": f64([[1.0, -1.0], [2.0, 0.5]]), "b": f64([0.0, -1.0])},
        {"W": f64([[3.0, -2.0]]), "b": f64([0.5])},
    )
    x, y = f64([[1.0, 2.0], [0.0, 0.0]]), f64([1.0, 0.5])
    # Example 1, x = (1, 2), y = 1:
    #   a1 = W1 x + b1 = (1 - 2 + 0, 2 + 1 - 1) = (-1, 2); z1 = relu = (0, 2)
    #   a2 = 3*0 - 2*2 + 0.5 = -3.5 = yhat;  L = 1/2 (-3.5 - 1)^2 = 10.125
    #   delta2 = yhat - y = -4.5
    #   dW2 = delta2 z1^T = (0, -9);  db2 = -4.5
    #   W2^T delta2 = (-13.5, 9); relu'(a1) = (0, 1) -> delta1 = (0, 9)
    #   dW1 = delta1 x^T = ((0, 0), (9, 18));  db1 = (0, 9)
    #   dx = W1^T delta1 = (1*0 + 2*9, -1*0 + 0.5*9) = (18, 4.5)
    # Example 2, x = (0, 0), y = 0.5:
    #   a1 = b1 = (0, -1); z1 = (0, 0) (relu'(0) = 0 as jax.nn.relu)
    #   a2 = 0.5 = y, so L = 0 and every gradient is 0.
    # Batch: J = (10.125 + 0) / 2 = 5.0625; gradients are half of example 1's.
    J, grads, dx = net.backprop(params, x[0], y[0], input_grad=True)
    assert J.dtype == jnp.float64 and float(J) == 10.125
    np.testing.assert_array_equal(grads[1]["W"], [[0.0, -9.0]])
    np.testing.assert_array_equal(grads[1]["b"], [-4.5])
    np.testing.assert_array_equal(grads[0]["W"], [[0.0, 0.0], [9.0, 18.0]])
    np.testing.assert_array_equal(grads[0]["b"], [0.0, 9.0])
    np.testing.assert_array_equal(dx, [18.0, 4.5])

    J, grads, dx = net.backprop(params, x, y, input_grad=True)
    assert float(J) == 5.0625
    np.testing.assert_array_equal(grads[0]["W"], [[0.0, 0.0], [4.5, 9.0]])
    np.testing.assert_array_equal(grads[1]["W"], [[0.0, -4.5]])
    np.testing.assert_array_equal(dx, [[9.0, 2.25], [0.0, 0.0]])
    assert_trees_close(grads, jax.grad(net.cost)(params, x, y), rtol=0)


# --- hand backward vs autodiff ------------------------------------------------


def test_contract_backprop_matches_jax_grad(contract):
    params, x, y = contract
    J, grads = CONTRACT.backprop(params, x, y)
    J2, auto = jax.value_and_grad(CONTRACT.cost)(params, x, y)
    assert J.dtype == jnp.float64
    np.testing.assert_allclose(J, J2, rtol=1e-15)
    assert max_rel(grads, auto) <= 1e-12


def test_contract_float32(contract):
    params64, x64, y = contract
    params = jax.tree.map(lambda t: t.astype(jnp.float32), params64)
    J64 = CONTRACT.cost(params64, x64, y)
    # Products pinned to full float32: float32 rounding on every platform.
    full = dataclasses.replace(CONTRACT, precision="highest")
    # x stays float64: it is converted to the parameters' dtype.
    J, grads = full.backprop(params, x64, y)
    assert J.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in leaves(grads))
    assert full.forward(params, x64).dtype == jnp.float32
    J2, auto = jax.value_and_grad(full.cost)(params, x64, y)
    np.testing.assert_allclose(J, J2, rtol=1e-6)
    assert max_rel(grads, auto) <= 1e-5
    np.testing.assert_allclose(J, J64, rtol=1e-5)
    # The platform default: float32 on a CPU, TF32 products on an NVIDIA GPU
    # (operands rounded to 11 significant bits, 2^-11 ~ 5e-4 relative), so
    # bounds that TF32 meets with room; a wrong gradient is off by O(1).
    J, grads = CONTRACT.backprop(params, x64, y)
    J2, auto = jax.value_and_grad(CONTRACT.cost)(params, x64, y)
    assert J.dtype == jnp.float32
    np.testing.assert_allclose(J, J2, rtol=1e-3)
    assert max_rel(grads, auto) <= 2e-3
    np.testing.assert_allclose(J, J64, rtol=2e-3)


def test_float_targets_converted_to_param_dtype():
    net = fnnet.MLP((3, 4, 2), "tanh", "sigmoid", "bce")
    params = net.init(jax.random.key(0), jnp.float64)
    x32 = jax.random.normal(jax.random.key(1), (5, 3), jnp.float32)
    y32 = jax.random.uniform(jax.random.key(2), (5, 2), jnp.float32)
    J, grads = net.backprop(params, x32, y32)
    assert J.dtype == jnp.float64
    assert all(g.dtype == jnp.float64 for g in leaves(grads))
    J2, g2 = net.backprop(params, x32.astype(jnp.float64), y32.astype(jnp.float64))
    np.testing.assert_array_equal(J, J2)
    assert_trees_close(grads, g2, rtol=0)
    # Host numpy inputs are accepted as well.
    J3, _ = net.backprop(params, np.asarray(x32), np.asarray(y32))
    np.testing.assert_array_equal(J, J3)


@pytest.fixture(scope="module")
def mixed():
    """A three-layer net with per-layer activations and a batch of 6."""
    net = fnnet.MLP((4, 5, 3, 2), activation=("softplus", "tanh"), output="identity")
    params = net.init(jax.random.key(10), jnp.float64)
    x = jax.random.normal(jax.random.key(11), (6, 4), jnp.float64)
    y = jax.random.normal(jax.random.key(12), (6, 2), jnp.float64)
    return net, params, x, y


def test_vmap_per_example_mean_equals_batch(mixed):
    net, params, x, y = mixed
    J, grads = net.backprop(params, x, y)  # matrix form
    Js, per_ex = jax.vmap(net.backprop, in_axes=(None, 0, 0))(params, x, y)
    assert Js.shape == (6,)
    assert all(g.shape[0] == 6 for g in leaves(per_ex))
    np.testing.assert_allclose(jnp.mean(Js), J, rtol=1e-14)
    assert_trees_close(jax.tree.map(lambda g: jnp.mean(g, 0), per_ex), grads, 1e-13)
    # The per-example recursion, example by example, without vmap.
    for i in (0, 5):
        Ji, gi = net.backprop(params, x[i], y[i])
        np.testing.assert_allclose(Ji, Js[i], rtol=1e-14)
        assert_trees_close(gi, jax.tree.map(lambda g, i=i: g[i], per_ex), 1e-13)
        assert_trees_close(gi, jax.grad(net.cost)(params, x[i], y[i]), 1e-12, 1e-15)
    # per_example_grads is the same vmap.
    L, pg = net.per_example_grads(params, x, y)
    np.testing.assert_allclose(L, Js, rtol=1e-14)
    assert_trees_close(pg, per_ex, rtol=1e-14)


@pytest.mark.parametrize("batched", [False, True])
def test_input_grad(mixed, contract, batched):
    net, params, x, y = mixed
    if not batched:
        x, y = x[0], y[0]
    J, grads, dx = net.backprop(params, x, y, input_grad=True)
    assert dx.shape == x.shape and dx.dtype == jnp.float64
    auto_p, auto_x = jax.grad(net.cost, argnums=(0, 1))(params, x, y)
    np.testing.assert_allclose(dx, auto_x, rtol=1e-12, atol=1e-16)
    assert max_rel(grads, auto_p) <= 1e-12
    # Integer labels as well.
    params_c, xc, yc = contract
    if not batched:
        xc, yc = xc[0], yc[0]
    _, _, dxc = CONTRACT.backprop(params_c, xc, yc, input_grad=True)
    auto_xc = jax.grad(CONTRACT.cost, argnums=1)(params_c, xc, yc)
    assert rel_error(dxc, auto_xc) <= 1e-12


# --- hand_cost and hand_forward: jax.grad runs the hand backward --------------


@pytest.fixture
def count_backward(monkeypatch):
    """Counts traces of fnnet.backward.backward (a counting double)."""
    calls = []
    real = bw.backward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bw, "backward", counting)
    return calls


@pytest.mark.parametrize(
    ("output", "loss"),
    [("tanh", "mse"), ("sigmoid", "bce"), ("softmax", "cross_entropy")],
)
def test_hand_cost_grads_equal_autodiff(output, loss, count_backward):
    # (3, 6, 4) is used nowhere else, so the traces below are fresh.
    net = fnnet.MLP((3, 6, 4), activation="gelu", output=output, loss=loss)
    params = net.init(jax.random.key(20), jnp.float64)
    x = jax.random.normal(jax.random.key(21), (5, 3), jnp.float64)
    y = jax.random.uniform(jax.random.key(22), (5, 4), jnp.float64)
    if loss == "cross_entropy":
        y = y / jnp.sum(y, axis=1, keepdims=True)
    np.testing.assert_allclose(
        net.hand_cost(params, x, y), net.cost(params, x, y), 1e-15
    )
    before = len(count_backward)
    hand = jax.grad(net.hand_cost, argnums=(0, 1, 2))(params, x, y)
    assert len(count_backward) > before  # the hand backward was traced
    auto = jax.grad(net.cost, argnums=(0, 1, 2))(params, x, y)
    assert max_rel(hand, auto) <= 1e-12
    assert hand[1].dtype == hand[2].dtype == jnp.float64
    if loss == "cross_entropy":  # integer labels: gradients w.r.t. params and x
        labels = jnp.asarray([0, 3, 1, 2, 2])
        hand = jax.grad(net.hand_cost, argnums=(0, 1))(params, x, labels)
        auto = jax.grad(net.cost, argnums=(0, 1))(params, x, labels)
        assert max_rel(hand, auto) <= 1e-12


def test_hand_cost_single_output_flat_targets():
    net = fnnet.MLP((3, 4, 1), "tanh", "sigmoid", "bce")
    params = net.init(jax.random.key(23), jnp.float64)
    x = jax.random.normal(jax.random.key(24), (5, 3), jnp.float64)
    y = f64([0.0, 1.0, 0.25, 0.5, 1.0])
    hand = jax.grad(net.hand_cost, argnums=(0, 1, 2))(params, x, y)
    auto = jax.grad(net.cost, argnums=(0, 1, 2))(params, x, y)
    assert hand[2].shape == (5,)
    assert max_rel(hand, auto) <= 1e-12


@pytest.mark.parametrize("loss_name", ["sum_of_squares", "log_softmax_entry", "sin"])
def test_hand_forward_with_arbitrary_jax_loss(loss_name, count_backward):
    # A different output per case: each trace below is fresh.
    output = {"sum_of_squares": "elu", "log_softmax_entry": "softmax", "sin": "gelu"}[
        loss_name
    ]
    net = fnnet.MLP((3, 5, 4, 3), activation=("sigmoid", "leaky_relu"), output=output)
    params = net.init(jax.random.key(30), jnp.float64)
    x = jax.random.normal(jax.random.key(31), (6, 3), jnp.float64)
    labels = jnp.asarray([0, 1, 2, 2, 1, 0])

    def outer(yhat):
        if loss_name == "sum_of_squares":
            return jnp.sum(jnp.square(yhat))
        if loss_name == "log_softmax_entry":
            return -jnp.mean(jnp.log(jnp.take_along_axis(yhat, labels[:, None], 1)))
        return jnp.sum(jnp.sin(3.0 * yhat)) / yhat.shape[0]

    np.testing.assert_array_equal(net.hand_forward(params, x), net.forward(params, x))
    before = len(count_backward)
    hand = jax.grad(lambda p, x: outer(net.hand_forward(p, x)), (0, 1))(params, x)
    assert len(count_backward) > before
    auto = jax.grad(lambda p, x: outer(net.forward(p, x)), (0, 1))(params, x)
    assert max_rel(hand, auto) <= 1e-12
    # One example too.
    hand1 = jax.grad(lambda p: jnp.sum(jnp.square(net.hand_forward(p, x[0]))))(params)
    auto1 = jax.grad(lambda p: jnp.sum(jnp.square(net.forward(p, x[0]))))(params)
    assert max_rel(hand1, auto1) <= 1e-12


def test_list_params_keep_their_structure(mixed):
    net, params, x, y = mixed
    as_list = list(params)
    _, grads = net.backprop(as_list, x, y)
    assert jax.tree.structure(grads) == jax.tree.structure(as_list)


def test_hand_cost_with_list_params(mixed):
    net, params, x, y = mixed
    hand = jax.grad(net.hand_cost)(list(params), x, y)
    auto = jax.grad(net.cost)(list(params), x, y)
    assert max_rel(hand, auto) <= 1e-12


# --- dropout ------------------------------------------------------------------


@pytest.fixture(scope="module")
def dropout_net():
    net = fnnet.MLP((4, 16, 16, 3), "tanh", "softmax", "cross_entropy", keep_prob=0.8)
    params = net.init(jax.random.key(40), jnp.float64)
    x = jax.random.normal(jax.random.key(41), (10, 4), jnp.float64)
    y = jax.random.randint(jax.random.key(42), (10,), 0, 3)
    return net, params, x, y


def test_dropout_hand_equals_autodiff_with_same_key(dropout_net):
    net, params, x, y = dropout_net
    key = jax.random.key(43)
    J, grads = net.backprop(params, x, y, key=key)
    J2, auto = jax.value_and_grad(net.cost)(params, x, y, key=key)
    np.testing.assert_allclose(J, J2, rtol=1e-15)
    assert max_rel(grads, auto) <= 1e-12
    hand = jax.grad(net.hand_cost)(params, x, y, key=key)
    assert max_rel(hand, auto) <= 1e-12
    # The mask is really on: another key gives another cost, the same key the
    # same bits (determinism).
    J3, grads3 = net.backprop(params, x, y, key=key)
    np.testing.assert_array_equal(J, J3)
    for a, b in zip(leaves(grads), leaves(grads3), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(net.cost(params, x, y, key=jax.random.key(44))) != float(J)
    assert float(net.cost(params, x, y)) != float(J)


def test_dropout_without_key_is_evaluation_mode(dropout_net):
    net, params, x, y = dropout_net
    plain = dataclasses.replace(net, keep_prob=1.0)
    np.testing.assert_array_equal(net.forward(params, x), plain.forward(params, x))
    np.testing.assert_array_equal(net.cost(params, x, y), plain.cost(params, x, y))
    J, grads = net.backprop(params, x, y)
    J1, grads1 = plain.backprop(params, x, y)
    np.testing.assert_array_equal(J, J1)
    assert_trees_close(grads, grads1, rtol=0)


def test_dropout_masks_are_inverted_bernoulli():
    net = fnnet.MLP((2, 300, 200, 1), keep_prob=0.8)
    masks = network.dropout_masks(net, jax.random.key(45), (50,), jnp.float64)
    assert [m.shape for m in masks] == [(50, 300), (50, 200)]
    for m in masks:
        values = np.unique(np.asarray(m))
        np.testing.assert_allclose(values, [0.0, 1 / 0.8], rtol=1e-15)
        # 15000 / 10000 draws: the kept fraction is p within 4 standard errors.
        kept = np.mean(np.asarray(m) > 0)
        assert abs(kept - 0.8) < 4 * np.sqrt(0.8 * 0.2 / m.size)


def test_per_example_grads_with_dropout_use_rows_of_the_batch_masks(dropout_net):
    net, params, x, y = dropout_net
    key = jax.random.key(46)
    L, per = net.per_example_grads(params, x, y, key=key)
    # The masks the batched pass draws for this key: one (N, M_l) per layer,
    # with units really dropped.
    masks = network.dropout_masks(net, key, (10,), jnp.float64)
    assert all(np.any(np.asarray(m) == 0) for m in masks)

    @jax.jit
    def oracle(params, x, y, masks):  # jax.grad of each example's own loss
        one = jax.value_and_grad(lambda p, xi, yi, mi: core.cost(net, p, xi, yi, mi))
        return jax.vmap(one, in_axes=(None, 0, 0, 0))(params, x, y, masks)

    L_ref, per_ref = oracle(params, x, y, masks)
    np.testing.assert_allclose(L, L_ref, rtol=1e-14)
    assert_trees_close(per, per_ref, rtol=1e-12, atol=1e-15)
    # Those are the batch's masks: the batched cost and hand gradient with the
    # same key are the means.
    J, grads = net.backprop(params, x, y, key=key)
    np.testing.assert_allclose(np.mean(L_ref), J, rtol=1e-14)
    mean = jax.tree.map(lambda g: jnp.mean(g, 0), per)
    assert_trees_close(mean, grads, rtol=1e-12, atol=1e-15)


def test_key_without_dropout_is_an_error(contract):
    params, x, y = contract
    match = r"key was given but keep_prob=1\.0.*keep_prob < 1"
    for call in (
        lambda: CONTRACT.forward(params, x, key=jax.random.key(0)),
        lambda: CONTRACT.cost(params, x, y, key=jax.random.key(0)),
        lambda: CONTRACT.backprop(params, x, y, key=jax.random.key(0)),
        lambda: CONTRACT.hand_cost(params, x, y, key=jax.random.key(0)),
    ):
        with pytest.raises(ValueError, match=match):
            call()


# --- jit, static net, no retracing --------------------------------------------


def test_jit_of_methods(contract):
    params, x, y = contract
    J, grads = CONTRACT.backprop(params, x, y)
    Jj, gj = jax.jit(CONTRACT.backprop)(params, x, y)
    np.testing.assert_allclose(Jj, J, rtol=1e-15)
    assert_trees_close(gj, grads, rtol=1e-14)
    np.testing.assert_allclose(
        jax.jit(CONTRACT.forward)(params, x), CONTRACT.forward(params, x), rtol=1e-15
    )


def test_net_as_static_argument_does_not_retrace():
    traces = []

    def step(net, params, x, y):
        traces.append(net)  # runs only while tracing
        J, grads = net.backprop(params, x, y)
        return J, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    step = jax.jit(step, static_argnums=0)
    net = fnnet.MLP((3, 7, 2), "softplus", "sigmoid", "bce")  # shape used only here
    params = net.init(jax.random.key(50), jnp.float64)
    keys = jax.random.split(jax.random.key(51), 6)
    for i in range(3):
        x = jax.random.normal(keys[2 * i], (4, 3), jnp.float64)
        y = jax.random.uniform(keys[2 * i + 1], (4, 2), jnp.float64)
        # An equal net built afresh is the same static argument.
        J, params = step(
            fnnet.MLP((3, 7, 2), "softplus", "sigmoid", "bce"), params, x, y
        )
    assert len(traces) == 1
    step(net, params, x[:2], y[:2])  # a new batch size is a new shape
    assert len(traces) == 2


def test_second_eager_call_with_new_data_is_cached(count_backward):
    net = fnnet.MLP((5, 3, 3), "elu", "softmax", "cross_entropy")  # used only here
    params = net.init(jax.random.key(60), jnp.float64)
    x1 = jax.random.normal(jax.random.key(61), (4, 5), jnp.float64)
    net.backprop(params, x1, jnp.asarray([0, 1, 2, 0]))
    traces = len(count_backward)
    assert traces == 1  # the first call traced the hand backward once
    params2 = jax.tree.map(lambda t: t + 1.0, params)
    net.backprop(params2, x1 + 1.0, jnp.asarray([2, 2, 1, 0]))
    assert len(count_backward) == traces


# --- no automatic differentiation on the hand path ----------------------------

AUTODIFF_FUNCTIONS = (
    "grad",
    "vjp",
    "jvp",
    "linearize",
    "value_and_grad",
    "jacfwd",
    "jacrev",
)
# Autodiff leaves custom_jvp/custom_vjp calls or jvp primitives in a jaxpr.
# (lax.transpose, the array transposition of Delta^T on the CPU, is not one.)
FORBIDDEN_PRIMITIVES = ("custom_jvp_call", "custom_vjp_call", "jvp", "linear_call")


def primitive_names(jaxpr):
    """Every primitive name in a jaxpr, nested jaxprs (jit, ...) included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= primitive_names(sub)
    return names


def test_backprop_calls_no_autodiff(monkeypatch):
    numpy_before = dict(vars(jnp))

    def forbidden(*args, **kwargs):
        raise AssertionError("automatic differentiation on the hand path")

    for name in AUTODIFF_FUNCTIONS:
        monkeypatch.setattr(jax, name, forbidden)
    # Fresh configurations (sizes used nowhere else): nothing is cached.
    nets = [
        fnnet.MLP((7, 5, 4, 3), ("gelu", "elu"), "softmax", "cross_entropy", 0.75),
        fnnet.MLP((6, 9, 2), "leaky_relu", "sigmoid", "mse"),
    ]
    for net in nets:
        params = net.init(jax.random.key(70), jnp.float64)
        x = jax.random.normal(jax.random.key(71), (5, net.sizes[0]), jnp.float64)
        if net.loss == "cross_entropy":
            y = jnp.asarray([0, 1, 2, 1, 0])
            key = jax.random.key(72)
        else:
            y = jax.random.uniform(jax.random.key(73), (5, 2), jnp.float64)
            key = None
        J, grads, dx = net.backprop(params, x, y, key=key, input_grad=True)
        Js, per_ex = jax.vmap(net.backprop, in_axes=(None, 0, 0))(params, x, y)
        assert bool(jnp.isfinite(J)) and Js.shape == (5,)
    net.per_example_grads(params, x, y)
    monkeypatch.undo()
    assert dict(vars(jnp)) == numpy_before  # jax.numpy itself untouched


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize(
    ("output", "loss"),
    [("softmax", "cross_entropy"), ("sigmoid", "bce"), ("softmax", "mse")],
)
def test_backprop_jaxpr_has_no_autodiff_primitives(output, loss, batched):
    net = fnnet.MLP((3, 4, 3), ("softplus",), output, loss)
    params = net.init(jax.random.key(80), jnp.float64)
    x = jax.random.normal(jax.random.key(81), (5, 3), jnp.float64)
    y = jax.random.uniform(jax.random.key(82), (5, 3), jnp.float64)
    y = y / jnp.sum(y, axis=1, keepdims=True)
    if not batched:
        x, y = x[0], y[0]
    jaxpr = jax.make_jaxpr(lambda p, x, y: net.backprop(p, x, y, input_grad=True))(
        params, x, y
    )
    text = str(jaxpr)
    names = primitive_names(jaxpr)
    assert "dot_general" in names  # the walk sees inside the jit
    for bad in FORBIDDEN_PRIMITIVES:
        assert bad not in text
        assert not any(bad in n for n in names), names


# --- bad input: each error names the argument, the expected and the received --


def test_bad_config_raises():
    cases = [
        (dict(sizes=(3,)), ValueError, r"sizes must list at least .* got \(3,\)"),
        (dict(sizes=(3, 0)), ValueError, r"sizes must be positive ints, got \(3, 0\)"),
        (dict(sizes="32"), TypeError, "sizes must be a tuple of ints, got '32'"),
        (
            dict(sizes=(3, 4), activation="swish"),
            ValueError,
            r"activation 'swish' is not supported; choose one of \('identity'",
        ),
        (
            dict(sizes=(3, 4, 4, 2), activation=("relu",)),
            ValueError,
            r"activation has 1 names but sizes=\(3, 4, 4, 2\) has 2 hidden",
        ),
        (
            dict(sizes=(3, 4), output="softmin"),
            ValueError,
            r"output 'softmin' is not supported; choose one of .*'softmax'",
        ),
        (
            dict(sizes=(3, 4), loss="hinge"),
            ValueError,
            r"loss 'hinge' is not supported; choose one of \('mse', 'bce', 'cross_e",
        ),
        (
            dict(sizes=(3, 4), output="softmax", loss="bce"),
            ValueError,
            r"loss='bce' needs output='sigmoid', got output='softmax'",
        ),
        (
            dict(sizes=(3, 4), output="sigmoid", loss="cross_entropy"),
            ValueError,
            r"loss='cross_entropy' needs output='softmax', got output='sigmoid'",
        ),
        (
            dict(sizes=(3, 1), output="softmax", loss="cross_entropy"),
            ValueError,
            r"needs at least 2 output units, got sizes\[-1\]=1",
        ),
        (dict(sizes=(3, 4), keep_prob=0.0), ValueError, r"keep_prob .* got 0\.0"),
        (dict(sizes=(3, 4), keep_prob=1.5), ValueError, r"keep_prob .* got 1\.5"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            fnnet.MLP(**kwargs)


@pytest.fixture(scope="module")
def small():
    """MLP (3, 4, 2) softmax/cross_entropy with float64 params and a batch of 5."""
    net = fnnet.MLP((3, 4, 2), "tanh", "softmax", "cross_entropy")
    params = net.init(jax.random.key(90), jnp.float64)
    x = jax.random.normal(jax.random.key(91), (5, 3), jnp.float64)
    return net, params, x, jnp.asarray([0, 1, 1, 0, 1])


def _replace(params, l, name, value):
    p = [dict(layer) for layer in params]
    p[l][name] = value
    return tuple(p)


def test_bad_params_raise(small):
    net, params, x, y = small
    cases = [
        (params[:1], ValueError, r"params has 1 layers but sizes=\(3, 4, 2\) needs 2"),
        (
            _replace(params, 0, "W", jnp.zeros((3, 4))),
            ValueError,
            r"params\[0\]\['W'\] must have shape \(4, 3\) .* got \(3, 4\)",
        ),
        (
            _replace(params, 1, "b", jnp.zeros((3,))),
            ValueError,
            r"params\[1\]\['b'\] must have shape \(2,\) .* got \(3,\)",
        ),
        (
            ({"W": params[0]["W"]}, params[1]),
            ValueError,
            r"params\[0\] must be a dict with keys 'W' and 'b', got \['W'\]",
        ),
        (
            _replace(params, 1, "W", params[1]["W"].astype(jnp.float32)),
            TypeError,
            r"one dtype: params\[0\]\['W'\] is float64 but params\[1\]\['W'\] is "
            "float32",
        ),
        (
            _replace(params, 0, "b", jnp.zeros(4, jnp.int32)),
            TypeError,
            r"params\[0\]\['b'\] must be floating, got int32",
        ),
        (params[0], TypeError, "params must be a tuple or list of 2 layers"),
    ]
    for bad, exc, match in cases:
        for call in (
            lambda bad=bad: net.forward(bad, x),
            lambda bad=bad: net.cost(bad, x, y),
            lambda bad=bad: net.backprop(bad, x, y),
            lambda bad=bad: fnnet.gradcheck(net, bad, x, y, fd=False),
        ):
            with pytest.raises(exc, match=match):
                call()


def test_bad_x_and_y_raise(small):
    net, params, x, y = small
    mse = fnnet.MLP((3, 4, 2), "tanh", "identity", "mse")
    yf = jnp.zeros((5, 2), jnp.float64)
    cases = [
        (
            net,
            x[:, :2],
            y,
            ValueError,
            r"x must have shape \(3,\) or \(N, 3\) .*"
            r"got \(5, 2\)",
        ),
        (net, x[None], y, ValueError, r"x must have shape .* got \(1, 5, 3\)"),
        (
            net,
            x.astype(jnp.int32),
            y,
            TypeError,
            "x must be floating point, got dtype int32",
        ),
        (
            net,
            x,
            y[:4],
            ValueError,
            r"y as integer labels must have shape \(5,\) "
            r"for x of shape \(5, 3\), got \(4,\)",
        ),
        (
            net,
            x,
            yf[:, :1],
            ValueError,
            r"y as probability rows must have shape "
            r"\(5, 2\) for x of shape \(5, 3\), got \(5, 1\)",
        ),
        (
            net,
            x,
            jnp.asarray([0, 2, 1, 0, 1]),
            ValueError,
            r"labels outside "
            r"\[0, 2\) for 2 output units: \[2\]",
        ),
        (
            net,
            x,
            jnp.ones((5,), bool),
            TypeError,
            "integer labels or floating probabilities, got dtype bool",
        ),
        (
            mse,
            x,
            jnp.zeros((5, 2), jnp.int32),
            TypeError,
            r"y for loss='mse' must "
            "be floating point, got dtype int32",
        ),
        (
            mse,
            x,
            yf[:, 0],
            ValueError,
            r"y must have shape \(5, 2\) \(the output's "
            r"shape\) for loss='mse', got \(5,\)",
        ),
        (mse, x[0], yf, ValueError, r"y must have shape \(2,\) .* got \(5, 2\)"),
    ]
    for model, xb, yb, exc, match in cases:
        for call in (model.cost, model.backprop, model.hand_cost):
            with pytest.raises(exc, match=match):
                call(params, xb, yb)
    with pytest.raises(ValueError, match=r"x must have shape .* got \(5, 2\)"):
        net.forward(params, x[:, :2])
    with pytest.raises(ValueError, match=r"x must be a batch \(N, 3\), got \(3,\)"):
        net.per_example_grads(params, x[0], y[0])
    # Shape checks also run under jit, at trace time.
    with pytest.raises(ValueError, match=r"x must have shape .* got \(5, 2\)"):
        jax.jit(net.backprop)(params, x[:, :2], y)
