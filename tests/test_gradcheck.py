"""Property tests of the hand backward pass, and tests of fnnet.gradcheck.

Every valid output/loss pair, in float64 and float32, on one example and on
a batch, is a test case of its own; hypothesis draws the rest of the network
(depth 1-6, widths 1-64, every hidden activation, batch 1-32). The hand
gradient is held against jax.grad (float64 <= 1e-10, float32 <= 1e-4) and,
on small smooth networks, against central finite differences (float64
<= 1e-6). The judge is the few lines of NumPy in ``references``, never
fnnet's own comparator. The worst errors seen are printed at the end of the
module (``pytest -s``). ``FNNET_HYPOTHESIS=deep`` draws many more networks
(see tests/conftest.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from references import central_differences, max_rel_error, rel_error

import fnnet
from fnnet.activations import HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS
from fnnet.gradcheck import LeafCheck
from fnnet.losses import CANONICAL_PAIRS, LOSSES, REQUIRED_OUTPUT

#: Every valid (output, loss): mse with any output; bce and cross_entropy
#: with the one output each needs.
PAIRS = [
    (output, loss)
    for loss in LOSSES
    for output in (
        OUTPUT_ACTIVATIONS
        if REQUIRED_OUTPUT[loss] is None
        else (REQUIRED_OUTPUT[loss],)
    )
]
SMOOTH = ("identity", "sigmoid", "tanh", "softplus", "gelu")
# The first entry of each list is what hypothesis tries first: a middling one.
WIDTHS = (5, 1, 2, 3, 8, 13, 32, 64)
BATCHES = (7, 1, 2, 32)
DTYPES = {"float64": (jnp.float64, 1e-10), "float32": (jnp.float32, 1e-4)}

WORST = {"f64 hand-auto": 0.0, "f64 hand-fd": 0.0, "f32 hand-auto": 0.0}


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    print("\nworst relative errors over the property tests:")
    for name, value in WORST.items():
        print(f"  {name}: {value:.3e}")


def record(name, value):
    assert math.isfinite(value), name
    WORST[name] = max(WORST[name], value)


def make_problem(sizes, activation, output, loss, batch, dtype, seed):
    """A network and well-scaled (params, x, y) built with numpy."""
    if loss == "cross_entropy" and sizes[-1] < 2:
        sizes = (*sizes[:-1], 2)
    net = fnnet.MLP(sizes, activation=activation, output=output, loss=loss)
    rng = np.random.default_rng(seed)
    params = tuple(
        {
            "W": jnp.asarray(rng.standard_normal((m, n)) / np.sqrt(n), dtype),
            "b": jnp.asarray(0.1 * rng.standard_normal(m), dtype),
        }
        for n, m in zip(sizes[:-1], sizes[1:], strict=True)
    )
    lead = () if batch is None else (batch,)
    K = sizes[-1]
    x = jnp.asarray(rng.standard_normal((*lead, sizes[0])), dtype)
    if loss == "cross_entropy":
        if rng.random() < 0.5:
            y = jnp.asarray(rng.integers(0, K, lead))
        else:
            p = rng.random((*lead, K)) + 0.05
            y = jnp.asarray(p / p.sum(-1, keepdims=True), dtype)
    elif loss == "bce":
        y = jnp.asarray(rng.random((*lead, K)), dtype)
    else:
        y = jnp.asarray(rng.standard_normal((*lead, K)), dtype)
    return net, params, x, y


@st.composite
def networks(draw, max_depth=6, widths=WIDTHS, batches=BATCHES, hidden=None):
    """(sizes, activation, batch, seed): everything but the output/loss pair."""
    depth = draw(st.integers(1, max_depth))
    sizes = tuple(draw(st.sampled_from(widths)) for _ in range(depth + 1))
    hidden = hidden or HIDDEN_ACTIVATIONS
    if draw(st.booleans()):
        activation = draw(st.sampled_from(hidden))
    else:
        activation = tuple(draw(st.sampled_from(hidden)) for _ in range(depth - 1))
    batch = draw(st.sampled_from(batches))
    seed = draw(st.integers(0, 2**16))
    return sizes, activation, batch, seed


def test_the_pairs_are_every_valid_pair():
    assert len(PAIRS) == len(OUTPUT_ACTIVATIONS) + 2
    assert set(CANONICAL_PAIRS) <= set(PAIRS)
    assert {("softmax", "mse"), ("leaky_relu", "mse"), ("tanh", "mse")} <= set(PAIRS)


@pytest.mark.parametrize("batched", [False, True], ids=["one", "batch"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("output", "loss"), PAIRS)
@settings(max_examples=examples(2))
@given(drawn=networks())
def test_hand_vs_jax_grad(output, loss, dtype, batched, drawn):
    sizes, activation, batch, seed = drawn
    dt, tol = DTYPES[dtype]
    net, params, x, y = make_problem(
        sizes, activation, output, loss, batch if batched else None, dt, seed
    )
    J, hand = net.backprop(params, x, y)
    J_auto, auto = jax.value_and_grad(net.cost)(params, x, y)
    assert jax.tree.structure(hand) == jax.tree.structure(params)
    assert all(g.dtype == dt for g in jax.tree.leaves(hand))
    np.testing.assert_allclose(J, J_auto, rtol=tol)
    err = max_rel_error(hand, auto)
    record(f"{'f64' if dtype == 'float64' else 'f32'} hand-auto", err)
    assert err <= tol, (net, err)


SMOOTH_PAIRS = [(o, loss) for o, loss in PAIRS if o in (*SMOOTH, "softmax")]


@pytest.mark.parametrize("batched", [False, True], ids=["one", "batch"])
@settings(max_examples=examples(4))
@given(
    drawn=networks(max_depth=3, widths=(3, 1, 2, 4), batches=(3, 1), hidden=SMOOTH),
    pair=st.sampled_from(SMOOTH_PAIRS),
)
def test_hand_vs_finite_differences_float64(batched, drawn, pair):
    sizes, activation, batch, seed = drawn
    net, params, x, y = make_problem(
        sizes, activation, *pair, batch if batched else None, jnp.float64, seed
    )
    _, hand = net.backprop(params, x, y)
    fd = central_differences(lambda p: net.cost(p, x, y), params)
    err = max_rel_error(hand, fd)
    record("f64 hand-fd", err)
    assert err <= 1e-6, (net, err)
    # gradcheck reports the same comparisons, per leaf, in the same terms.
    report = fnnet.gradcheck(net, params, x, y)
    auto = jax.grad(net.cost)(params, x, y)
    assert all(r.fd == "full" for r in report.rows)
    for r in report.rows:
        h, a = hand[r.layer - 1][r.leaf], auto[r.layer - 1][r.leaf]
        assert r.hand_vs_auto <= 1e-10
        assert math.isclose(r.hand_vs_auto, rel_error(h, a), abs_tol=1e-14)
        assert r.hand_vs_fd <= 1e-6 and r.auto_vs_fd <= 1e-6
        assert math.isclose(r.norm, float(np.linalg.norm(np.asarray(h))), rel_tol=1e-6)


def test_gradcheck_random_directions_and_dropout():
    """Leaves larger than max_fd_coords are checked along random directions."""
    net = fnnet.MLP((6, 5, 3), "tanh", "softmax", "cross_entropy", keep_prob=0.7)
    _, params, x, y = make_problem(
        (6, 5, 3), "tanh", "softmax", "cross_entropy", 4, jnp.float64, 1
    )
    report = fnnet.gradcheck(
        net, params, x, y, key=jax.random.key(0), max_fd_coords=10, directions=4
    )
    modes = {(r.layer, r.leaf): r.fd for r in report.rows}
    assert modes == {
        (1, "W"): "4 dirs",
        (1, "b"): "full",
        (2, "W"): "4 dirs",
        (2, "b"): "full",
    }
    assert report.worst() <= 1e-10
    assert report.worst("hand_vs_fd") <= 1e-6
    record("f64 hand-fd", report.worst("hand_vs_fd"))


def test_report_table():
    net, params, x, y = make_problem(
        (3, 2, 2), "gelu", "identity", "mse", 5, jnp.float64, 2
    )
    report = fnnet.gradcheck(net, params, x, y, fd=False)
    assert [(r.layer, r.leaf, r.shape) for r in report.rows] == [
        (1, "W", (2, 3)),
        (1, "b", (2,)),
        (2, "W", (2, 2)),
        (2, "b", (2,)),
    ]
    for r in report.rows:
        assert r.fd == "-" and math.isnan(r.hand_vs_fd) and math.isnan(r.auto_vs_fd)
        assert r.norm > 0
    text = str(report)
    assert text.startswith("gradcheck (float64, fd eps=1e-05)")
    assert "hand-auto" in text and "worst:" in text
    assert len(text.splitlines()) == 3 + len(report.rows) + 1


def test_worst_names_its_columns():
    rows = tuple(
        LeafCheck(1, leaf, (2,), 1.0, ha, hf, af, "full")
        for leaf, ha, hf, af in (("W", 1e-16, 3e-9, 2e-9), ("b", 4e-16, 1e-9, 5e-9))
    )
    report = fnnet.GradcheckReport(rows, "float64", 1e-5)
    assert report.worst() == report.worst("hand_vs_auto") == 4e-16
    assert report.worst("hand_vs_fd") == 3e-9
    assert report.worst("auto_vs_fd") == 5e-9
    assert fnnet.GradcheckReport.COLUMNS == ("hand_vs_auto", "hand_vs_fd", "auto_vs_fd")
    for column in fnnet.GradcheckReport.COLUMNS:  # each one is documented
        assert (
            f"``{column!r}``".replace("'", '"') in fnnet.GradcheckReport.worst.__doc__
        )
    listed = "hand_vs_auto, hand_vs_fd, auto_vs_fd, got 'hand-auto'"
    with pytest.raises(ValueError, match=f"column must be one of {listed}"):
        report.worst("hand-auto")


def test_gradcheck_detects_a_wrong_gradient(monkeypatch):
    """A broken hand backward (dW off by 1%) is caught by both references."""
    from fnnet import backward as bw

    real = bw.weight_grad
    monkeypatch.setattr(bw, "weight_grad", lambda d, z, *p: 1.01 * real(d, z, *p))
    net, params, x, y = make_problem(
        (2, 3, 2), "sigmoid", "identity", "mse", 3, jnp.float64, 3
    )
    report = fnnet.gradcheck(net, params, x, y)
    for r in report.rows:
        if r.leaf == "W":
            assert r.hand_vs_auto > 5e-3 and r.hand_vs_fd > 5e-3
            assert r.auto_vs_fd < 1e-6
        else:
            assert r.hand_vs_auto < 1e-12


def test_relative_error():
    assert fnnet.relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert fnnet.relative_error([3.0, 4.0], [0.0, 0.0]) == 1.0
    assert fnnet.relative_error([1.0, 0.0], [-1.0, 0.0]) == 2.0
    u, v = np.array([1.0, 2.0, 2.0]), np.array([1.0, 2.0, 2.3])
    expected = 0.3 / np.linalg.norm(v)
    assert math.isclose(fnnet.relative_error(u, v), expected, rel_tol=1e-14)
    assert math.isclose(fnnet.relative_error(v, u), expected, rel_tol=1e-14)
    assert math.isclose(
        fnnet.relative_error(1e-30 * u, 1e-30 * v), expected, rel_tol=1e-12
    )  # scale-free
    assert fnnet.relative_error(np.ones((2, 2), np.float32), np.ones(4)) == 0.0
    # Known values: a vector against twice itself, orthogonal unit vectors,
    # a relative error of 1e-12, and one entry off among many.
    assert fnnet.relative_error([1.0, 2.0], [2.0, 4.0]) == 0.5
    assert math.isclose(fnnet.relative_error([1.0, 0.0], [0.0, 1.0]), math.sqrt(2))
    w = np.full(10, 3.0)
    assert math.isclose(
        fnnet.relative_error(w, w * (1 + 1e-12)), 1e-12 / (1 + 1e-12), rel_tol=1e-3
    )
    w2 = w.copy()
    w2[4] += 1.0
    expected = 1.0 / np.sqrt(9 * 9 + 4**2)  # ||e_4|| / ||w2||
    assert math.isclose(fnnet.relative_error(w, w2), expected, rel_tol=1e-14)
    # float32 inputs are compared in float64: 1 + 2^-20 is exact in both.
    a32 = np.array([1.0 + 2.0**-20], np.float32)
    assert fnnet.relative_error(a32, np.ones(1, np.float32)) == pytest.approx(
        2.0**-20 / (1 + 2.0**-20), rel=1e-12
    )
    assert isinstance(fnnet.relative_error([1.0], [1.0]), float)


def test_gradcheck_runs_input_checks():
    net, params, x, y = make_problem(
        (3, 2, 2), "tanh", "softmax", "cross_entropy", 4, jnp.float64, 4
    )
    with pytest.raises(ValueError, match=r"x must have shape \(3,\) or \(N, 3\)"):
        fnnet.gradcheck(net, params, x[:, :2], y)
    with pytest.raises(ValueError, match=r"key was given but keep_prob=1\.0"):
        fnnet.gradcheck(net, params, x, y, key=jax.random.key(0))
