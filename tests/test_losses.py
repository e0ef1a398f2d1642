"""Tests for fnnet.losses: values against optax, deltas against jax.grad.

The output delta of every output/loss pair (the fused canonical ``yhat - y``
and the general rules of eqs. 5 and 6) is held against ``jax.grad`` of the
per-example loss with respect to the logits a^(L), including logits of 1e4.
Cost conventions (mean over the batch, bce summed over units) and target forms
are checked through :class:`fnnet.MLP`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnnet
from fnnet import losses
from fnnet.activations import OUTPUT_ACTIVATIONS, output_fn

K = 3  # output units

# Every pair the library accepts: the canonical ones and mse with any output.
PAIRS = [
    ("identity", "mse"),
    ("sigmoid", "bce"),
    ("softmax", "cross_entropy"),
    *[(out, "mse") for out in OUTPUT_ACTIVATIONS if out != "identity"],
]
CANONICAL = [("identity", "mse"), ("sigmoid", "bce"), ("softmax", "cross_entropy")]


def targets(loss, shape, dtype, rng):
    """Valid float targets of ``shape``: probabilities for bce, rows for ce."""
    if loss == "cross_entropy":
        p = rng.random(shape) + 0.1
        return jnp.asarray(p / p.sum(-1, keepdims=True), dtype)
    if loss == "bce":
        return jnp.asarray(rng.random(shape), dtype)
    return jnp.asarray(rng.standard_normal(shape), dtype)


def logits(dtype, rng, n=6):
    """(n + 2, K) logits: random rows and two rows of +-1e4."""
    a = rng.standard_normal((n, K)) * 3
    huge = np.array([[1e4, -1e4, 0.5], [-1e4, -1e4, 1e4]])
    return jnp.asarray(np.concatenate([a, huge]), dtype)


@functools.partial(jax.jit, static_argnums=(0, 1))
def delta_and_grad(output, loss, a, y):
    """(L_i, hand delta^(L), jax.grad of sum_i L_i w.r.t. the logits)."""
    h = output_fn(output)

    def total(a):
        return jnp.sum(losses.per_example_loss(loss, a, h(a), y))

    yhat = h(a)
    y_dense = losses.dense_targets(loss, y, a.shape[-1], a.dtype)
    hand = losses.output_delta(output, loss, a, yhat, y_dense)
    return losses.per_example_loss(loss, a, yhat, y), hand, jax.grad(total)(a)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(("output", "loss"), PAIRS)
def test_output_delta_matches_jax_grad(output, loss, dtype):
    rng = np.random.default_rng(0)
    a = logits(dtype, rng)
    y = targets(loss, a.shape, dtype, rng)
    L, hand, auto = delta_and_grad(output, loss, a, y)
    assert L.shape == (a.shape[0],)
    assert L.dtype == hand.dtype == auto.dtype == dtype
    # Logits of 1e4: finite loss, finite delta, and the same delta as jax.grad.
    for value in (L, hand, auto):
        assert bool(jnp.all(jnp.isfinite(value)))
    rtol = 1e-5 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(hand, auto, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_cross_entropy_integer_labels_match_one_hot(dtype):
    rng = np.random.default_rng(1)
    a = logits(dtype, rng)
    labels = jnp.asarray(rng.integers(0, K, a.shape[0]))
    one_hot = jax.nn.one_hot(labels, K, dtype=dtype)
    L_int, d_int, g_int = delta_and_grad("softmax", "cross_entropy", a, labels)
    L_hot, d_hot, g_hot = delta_and_grad("softmax", "cross_entropy", a, one_hot)
    rtol = 1e-6 if dtype == jnp.float32 else 1e-14
    np.testing.assert_allclose(L_int, L_hot, rtol=rtol)
    np.testing.assert_allclose(d_int, d_hot, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(g_int, g_hot, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(d_int, g_int, rtol=rtol, atol=rtol)
    np.testing.assert_array_equal(losses.one_hot(labels[0], K, dtype), one_hot[0])


def test_loss_values_match_optax():
    rng = np.random.default_rng(2)
    a = jnp.asarray(rng.standard_normal((5, K)) * 2, jnp.float64)
    labels = jnp.asarray(rng.integers(0, K, 5))
    rows = targets("cross_entropy", a.shape, jnp.float64, rng)
    probs = targets("bce", a.shape, jnp.float64, rng)
    y = targets("mse", a.shape, jnp.float64, rng)

    def L(loss, output, y):
        return losses.per_example_loss(loss, a, output_fn(output)(a), y)

    # mse: 1/2 ||yhat - y||^2 (optax.l2_loss is 1/2 (yhat - y)^2 per unit).
    np.testing.assert_allclose(
        L("mse", "identity", y), optax.l2_loss(a, y).sum(-1), rtol=1e-14
    )
    np.testing.assert_allclose(
        L("mse", "sigmoid", y),
        optax.l2_loss(jax.nn.sigmoid(a), y).sum(-1),
        rtol=1e-14,
    )
    # bce: summed over the output units.
    np.testing.assert_allclose(
        L("bce", "sigmoid", probs),
        optax.sigmoid_binary_cross_entropy(a, probs).sum(-1),
        rtol=1e-13,
    )
    np.testing.assert_allclose(
        L("cross_entropy", "softmax", labels),
        optax.softmax_cross_entropy_with_integer_labels(a, labels),
        rtol=1e-13,
    )
    np.testing.assert_allclose(
        L("cross_entropy", "softmax", rows),
        optax.softmax_cross_entropy(a, rows),
        rtol=1e-13,
    )


def test_canonical_values_at_huge_logits_by_hand():
    a = jnp.asarray([[1e4, -1e4, 0.0]], jnp.float64)
    # cross_entropy, label 1: logsumexp(a) - a_1 = 1e4 - (-1e4) = 2e4.
    label = jnp.asarray([1])
    L = losses.per_example_loss("cross_entropy", a, output_fn("softmax")(a), label)
    assert float(L[0]) == 2e4
    # bce: softplus(a) - y a per unit. y = (0, 0, 1):
    #   unit 1: softplus(1e4) - 0 = 1e4; unit 2: softplus(-1e4) = e^-1e4 = 0;
    #   unit 3: softplus(0) - 0 = log 2.
    y = jnp.asarray([[0.0, 0.0, 1.0]], jnp.float64)
    L = losses.per_example_loss("bce", a, output_fn("sigmoid")(a), y)
    np.testing.assert_allclose(L, [1e4 + np.log(2.0)], rtol=1e-15)
    # mse with identity: 1/2 (1e4^2 + 1e4^2 + 1^2) for y = (0, 0, 1).
    L = losses.per_example_loss("mse", a, a, y)
    np.testing.assert_allclose(L, [0.5 * (2e8 + 1.0)], rtol=1e-15)


@pytest.mark.parametrize("loss", ["mse", "bce", "cross_entropy"])
def test_target_grad_matches_jax_grad(loss):
    output = losses.REQUIRED_OUTPUT[loss] or "tanh"
    rng = np.random.default_rng(3)
    a = logits(jnp.float64, rng)
    y = targets(loss, a.shape, jnp.float64, rng)
    h = output_fn(output)
    auto = jax.grad(lambda y: jnp.sum(losses.per_example_loss(loss, a, h(a), y)))(y)
    hand = losses.target_grad(loss, a, h(a), y)
    np.testing.assert_allclose(hand, auto, rtol=1e-13, atol=1e-13)


def test_general_rule_softmax_is_jacobian_vector_product():
    """yhat * (g - <g, yhat>) equals J_softmax^T g with the full Jacobian."""
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.standard_normal(K), jnp.float64)
    g = jnp.asarray(rng.standard_normal(K), jnp.float64)
    yhat = jax.nn.softmax(a)
    jac = jnp.diag(yhat) - jnp.outer(yhat, yhat)
    np.testing.assert_allclose(
        losses.output_delta_from_grad("softmax", a, yhat, g), jac.T @ g, rtol=1e-14
    )


def test_unknown_names_raise():
    a = jnp.zeros((2, K))
    with pytest.raises(ValueError, match=r"loss must be one of .*'hinge'"):
        losses.per_example_loss("hinge", a, a, a)
    with pytest.raises(ValueError, match="'bce' has only its canonical"):
        losses.loss_grad_wrt_yhat("bce", a, a)


# --- Through the network: J conventions, target forms, value checks ----------


def one_layer(output, loss, K=K, M0=4, dtype=jnp.float64, seed=0):
    """A single-layer net (no hidden layer) so that a^(L) = x W^T + b is easy."""
    net = fnnet.MLP((M0, K), output=output, loss=loss)
    rng = np.random.default_rng(seed)
    params = (
        {
            "W": jnp.asarray(rng.standard_normal((K, M0)), dtype),
            "b": jnp.asarray(rng.standard_normal(K), dtype),
        },
    )
    x = jnp.asarray(rng.standard_normal((5, M0)), dtype)
    return net, params, x


def numpy_logits(params, x):
    return np.asarray(x) @ np.asarray(params[0]["W"]).T + np.asarray(params[0]["b"])


def test_cost_is_mean_over_batch_and_bce_sums_units():
    rng = np.random.default_rng(5)
    # mse: mean over rows of 1/2 ||yhat - y||^2.
    net, params, x = one_layer("identity", "mse")
    y = targets("mse", (5, K), jnp.float64, rng)
    a = numpy_logits(params, x)
    expected = np.mean(0.5 * np.sum((a - np.asarray(y)) ** 2, axis=1))
    J = net.cost(params, x, y)
    assert J.dtype == jnp.float64
    np.testing.assert_allclose(J, expected, rtol=1e-14)
    # bce: -[y log s + (1 - y) log(1 - s)] summed over units, mean over rows.
    net, params, x = one_layer("sigmoid", "bce")
    y = targets("bce", (5, K), jnp.float64, rng)
    s = 1.0 / (1.0 + np.exp(-numpy_logits(params, x)))
    y_ = np.asarray(y)
    expected = np.mean(-np.sum(y_ * np.log(s) + (1 - y_) * np.log(1 - s), axis=1))
    np.testing.assert_allclose(net.cost(params, x, y), expected, rtol=1e-12)
    # cross_entropy: mean over rows of -log softmax(a)_label.
    net, params, x = one_layer("softmax", "cross_entropy")
    labels = np.array([0, 2, 1, 1, 0])
    a = numpy_logits(params, x)
    logp = a - np.log(np.sum(np.exp(a), axis=1, keepdims=True))
    expected = -np.mean(logp[np.arange(5), labels])
    np.testing.assert_allclose(net.cost(params, x, labels), expected, rtol=1e-13)


@pytest.mark.parametrize(("output", "loss"), CANONICAL)
def test_canonical_pairs_at_huge_logits_through_network(output, loss):
    """Logits of +-1e4: J and its gradients are finite and equal jax.grad's."""
    net = fnnet.MLP((2, K), output=output, loss=loss)
    W = jnp.asarray([[1e4, 0.0], [-1e4, 0.0], [0.0, 1e4]], jnp.float64)
    params = ({"W": W, "b": jnp.zeros(K, jnp.float64)},)
    # No logit is exactly 0 (see test_bce_jax_grad_at_zero_logit).
    x = jnp.asarray([[1.0, 0.5], [-1.0, 1.0], [0.25, -1.0]], jnp.float64)
    if loss == "cross_entropy":
        y = jnp.asarray([1, 0, 2])
    else:
        y = jnp.asarray([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    J, grads = net.backprop(params, x, y)
    J2, auto = jax.value_and_grad(net.cost)(params, x, y)
    assert J.dtype == grads[0]["W"].dtype == jnp.float64
    assert np.isfinite(float(J)) and float(J) > 1e3  # confident and wrong rows
    for leaf in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    np.testing.assert_allclose(J, J2, rtol=1e-15)
    for h, g in zip(jax.tree.leaves(grads), jax.tree.leaves(auto), strict=True):
        np.testing.assert_allclose(h, g, rtol=1e-12, atol=1e-12)


def test_bce_jax_grad_at_zero_logit():
    net = fnnet.MLP((2, 1), output="sigmoid", loss="bce")
    params = ({"W": jnp.zeros((1, 2)), "b": jnp.zeros(1)},)  # every logit is 0
    x = jnp.asarray([[1.0, 2.0], [3.0, -1.0]])
    y = jnp.asarray([1.0, 0.0])
    # dJ/db = mean(sigma(0) - y) = mean(0.5 - 1, 0.5 - 0) = 0.
    # dJ/dW = mean((sigma(0) - y) x) = ((-0.5)(1, 2) + (0.5)(3, -1)) / 2
    #       = (1, -1.5) / 2 = (0.5, -0.75).
    _, hand = net.backprop(params, x, y)
    np.testing.assert_allclose(hand[0]["b"], [0.0], atol=1e-16)
    np.testing.assert_allclose(hand[0]["W"], [[0.5, -0.75]], rtol=1e-15)
    auto = jax.grad(net.cost)(params, x, y)
    np.testing.assert_allclose(auto[0]["W"], [[0.5, -0.75]], rtol=1e-15)


@pytest.mark.parametrize(
    ("output", "loss"), [("sigmoid", "bce"), ("identity", "mse"), ("tanh", "mse")]
)
def test_single_output_unit_accepts_flat_targets(output, loss):
    net, params, x = one_layer(output, loss, K=1)
    y = jnp.asarray([0.0, 1.0, 1.0, 0.5, 0.25], jnp.float64)
    # The two target shapes compile to two programs, which XLA may fuse
    # differently (on a GPU they differ in the last bit): equal to float64
    # rounding, not bit for bit. A target broadcast the wrong way, (N,)
    # against (N, 1), would be off by O(1).
    tight = dict(rtol=1e-14, atol=1e-15)
    J1, g1 = net.backprop(params, x, y)
    J2, g2 = net.backprop(params, x, y[:, None])
    np.testing.assert_allclose(J1, J2, **tight)
    for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        assert u.shape == v.shape
        np.testing.assert_allclose(u, v, **tight)
    # One example: y of shape () or (1,).
    Js, gs = net.backprop(params, x[0], y[0])
    Jv, gv = net.backprop(params, x[0], y[:1])
    np.testing.assert_allclose(Js, Jv, **tight)
    np.testing.assert_allclose(gs[0]["W"], gv[0]["W"], **tight)
    assert gs[0]["W"].shape == (1, 4)


def test_cross_entropy_target_forms_agree():
    net, params, x = one_layer("softmax", "cross_entropy")
    labels = jnp.asarray([2, 0, 1, 1, 2])
    rows = jax.nn.one_hot(labels, K, dtype=jnp.float64)
    J1, g1 = net.backprop(params, x, labels)
    J2, g2 = net.backprop(params, x, rows)
    np.testing.assert_allclose(J1, J2, rtol=1e-15)
    for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-14, atol=1e-16)
    # One example: an int label of shape () and a (K,) row.
    Js, gs = net.backprop(params, x[0], labels[0])
    Jr, gr = net.backprop(params, x[0], rows[0])
    np.testing.assert_allclose(Js, Jr, rtol=1e-15)
    np.testing.assert_allclose(gs[0]["W"], gr[0]["W"], rtol=1e-14)
    # A python int label works too.
    np.testing.assert_allclose(net.cost(params, x[0], 2), Js, rtol=1e-15)
    # Soft rows: J equals optax's soft cross-entropy.
    soft = targets("cross_entropy", (5, K), jnp.float64, np.random.default_rng(6))
    a = jnp.asarray(numpy_logits(params, x))
    np.testing.assert_allclose(
        net.cost(params, x, soft), optax.softmax_cross_entropy(a, soft).mean(), 1e-13
    )


@pytest.mark.parametrize(
    ("output", "loss", "y", "match"),
    [
        (
            "softmax",
            "cross_entropy",
            [0, 3, 1, 0, 0],
            r"labels outside \[0, 3\).*\[3\]",
        ),
        ("softmax", "cross_entropy", [0, -1, 1, 0, 7], r"outside \[0, 3\).*\[-1, 7\]"),
        (
            "softmax",
            "cross_entropy",
            np.full((5, 3), 0.5),
            r"probability rows must be non-negative and sum to 1.*\+0\.5",
        ),
        (
            "softmax",
            "cross_entropy",
            np.tile([1.5, -0.5, 0.0], (5, 1)),
            "non-negative and sum to 1",
        ),
        ("sigmoid", "bce", np.full((5, 3), 1.5), r"'bce' must lie in \[0, 1\].*1\.5"),
        ("identity", "mse", np.full((5, 3), np.nan), "NaN or infinite"),
    ],
)
def test_bad_target_values_raise(output, loss, y, match):
    net, params, x = one_layer(output, loss)
    y = np.asarray(y)
    for f in (net.cost, net.backprop, net.hand_cost):
        with pytest.raises(ValueError, match=match):
            f(params, x, y)


def test_value_checks_skip_under_jit_but_shape_checks_do_not():
    net, params, x = one_layer("softmax", "cross_entropy")
    bad_rows = jnp.full((5, K), 0.5, jnp.float64)  # rows sum to 1.5
    cost = jax.jit(net.cost)
    J = cost(params, x, bad_rows)  # values are tracers: not checked
    assert np.isfinite(float(J))
    with pytest.raises(ValueError, match=r"shape \(5, 3\).*got \(5, 2\)"):
        cost(params, x, bad_rows[:, :2])
    with pytest.raises(ValueError, match=r"shape \(5,\).*got \(4,\)"):
        jax.jit(net.backprop)(params, x, jnp.zeros(4, jnp.int32))
