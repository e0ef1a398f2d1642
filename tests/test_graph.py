"""Tests for fnnet.graph: the scalar computational graph (docs/derivation.md eq. 22).

The oracle is jax.grad of the same function written in jax.numpy, in float64.
"""

import math
import shutil
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from budget import examples
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fnnet import graph

jax.config.update("jax_enable_x64", True)  # also set in conftest.py

RTOL = 1e-12

EXAMPLE_W = [[0.65, 1.19], [0.69, -0.92]]
EXAMPLE_X = [0.2, 0.7]
EXAMPLE_B = [0.0, 0.0]
EXAMPLE_Y = [1.0, 0.0]


def f64(value):
    """A float64 JAX array, checked: the comparisons below need double precision."""
    array = jnp.asarray(value, dtype=jnp.float64)
    assert array.dtype == jnp.float64
    return array


def assert_close(ours, reference):
    reference = np.asarray(reference)
    assert reference.dtype == np.float64
    np.testing.assert_allclose(ours, reference, rtol=RTOL, atol=0.0)


# --- The worked examples (docs/derivation.md#worked-examples) against jax.grad ---


def test_linear_regression_matches_jax():
    w, x, y = [0.65, 1.19], [0.2, 0.7], 1.0
    nodes = graph.linear_regression(w, x, y)
    grads = graph.backward(nodes["L"])

    def loss(w, x, y):
        return (jnp.dot(w, x) - y) ** 2

    args = (f64(w), f64(x), f64(y))
    assert_close(nodes["L"].value, loss(*args))
    dw, dx, dy = jax.grad(loss, argnums=(0, 1, 2))(*args)
    assert_close([grads[nodes["w1"]], grads[nodes["w2"]]], dw)
    assert_close([grads[nodes["x1"]], grads[nodes["x2"]]], dx)
    assert_close(grads[nodes["y"]], dy)
    # By hand: r = 0.65·0.2 + 1.19·0.7 − 1 = −0.037 and dL/dw_k = 2 r x_k.
    assert nodes["r"].value == pytest.approx(-0.037, rel=1e-12)
    assert grads[nodes["w1"]] == pytest.approx(2 * -0.037 * 0.2, rel=1e-12)


def softmax_cross_entropy(W, x, b, y):
    h = jnp.exp(W @ x + b)
    return -jnp.sum(y * jnp.log(h / jnp.sum(h)))


@pytest.mark.parametrize(
    "W, x, b, y",
    [
        (EXAMPLE_W, EXAMPLE_X, EXAMPLE_B, EXAMPLE_Y),
        ([[0.3, -1.2, 0.5], [2.0, 0.1, -0.4]], [1.0, -0.5, 0.25], [0.1, -0.2], [0, 1]),
        ([[0.5], [-1.0], [2.0]], [0.3], [0.0, 0.1, -0.1], [0.2, 0.5, 0.3]),
    ],
)
def test_softmax_regression_matches_jax(W, x, b, y):
    nodes = graph.softmax_regression(W, x, b, y)
    grads = graph.backward(nodes["L"])
    K, D = len(W), len(x)
    args = (f64(W), f64(x), f64(b), f64(y))
    assert_close(nodes["L"].value, softmax_cross_entropy(*args))
    dW, dx, db, dy = jax.grad(softmax_cross_entropy, argnums=(0, 1, 2, 3))(*args)
    ours_dW = [
        [grads[nodes[f"W{i}{k}"]] for k in range(1, D + 1)] for i in range(1, K + 1)
    ]
    assert_close(ours_dW, dW)
    assert_close([grads[nodes[f"x{k}"]] for k in range(1, D + 1)], dx)
    assert_close([grads[nodes[f"b{i}"]] for i in range(1, K + 1)], db)
    assert_close([grads[nodes[f"y{i}"]] for i in range(1, K + 1)], dy)


def test_softmax_regression_bias_derivative_is_yhat_minus_y():
    """dL/db_1 = yhat_1 − y_1 for one-hot y (and dL/dz_i likewise): eq. 7."""
    nodes = graph.softmax_regression(EXAMPLE_W, EXAMPLE_X, EXAMPLE_B, EXAMPLE_Y)
    grads = graph.backward(nodes["L"])
    for i in (1, 2):
        expected = nodes[f"yhat{i}"].value - EXAMPLE_Y[i - 1]
        assert grads[nodes[f"b{i}"]] == pytest.approx(expected, rel=1e-12)
        assert grads[nodes[f"z{i}"]] == pytest.approx(expected, rel=1e-12)
    # z_1 = 0.65·0.2 + 1.19·0.7 = 0.963, z_2 = 0.69·0.2 − 0.92·0.7 = −0.506.
    assert nodes["z1"].value == pytest.approx(0.963, rel=1e-12)
    assert nodes["z2"].value == pytest.approx(-0.506, rel=1e-12)
    yhat1 = 1.0 / (1.0 + math.exp(-0.506 - 0.963))
    assert nodes["yhat1"].value == pytest.approx(yhat1, rel=1e-12)


# --- Random expression graphs against jax.grad ---

GRAPH_LIB = SimpleNamespace(
    neg=graph.neg,
    square=graph.square,
    exp=graph.exp,
    log=graph.log,
    identity=graph.identity,
)
JAX_LIB = SimpleNamespace(
    neg=jnp.negative,
    square=jnp.square,
    exp=jnp.exp,
    log=jnp.log,
    identity=lambda u: u,
)

# Each step builds one expression from nodes u, v of the pool; log only sees
# squares + 1 or exp(...), and division only squares + 1, so no domain errors.
STEPS = {
    "add": lambda lib, u, v: u + v,
    "sub": lambda lib, u, v: u - v,
    "mul": lambda lib, u, v: u * v,
    "div": lambda lib, u, v: u / (lib.square(v) + 1.0),
    "rdiv": lambda lib, u, v: 2.0 / (lib.square(u) + 1.0),
    "neg": lambda lib, u, v: -u,
    "square": lambda lib, u, v: lib.square(u),
    "pow2": lambda lib, u, v: u**2,
    "exp": lambda lib, u, v: lib.exp(u),
    "log": lambda lib, u, v: lib.log(lib.square(u) + 1.0),
    "log_exp": lambda lib, u, v: lib.log(lib.exp(u)),
    "identity": lambda lib, u, v: lib.identity(u),
    "constants": lambda lib, u, v: 0.5 + 1.5 * u - 0.25,
    "rsub": lambda lib, u, v: 1.0 - u * v,
}


def evaluate_recipe(recipe, inputs, lib):
    """Builds the same expression DAG from `inputs` with either library."""
    pool = list(inputs)
    for step, i, j in recipe:
        pool.append(STEPS[step](lib, pool[i % len(pool)], pool[j % len(pool)]))
    return pool[-1]


recipes = st.lists(
    st.tuples(st.sampled_from(sorted(STEPS)), st.integers(0, 30), st.integers(0, 30)),
    min_size=1,
    max_size=15,
)
input_values = st.lists(
    st.floats(-2.0, 2.0, allow_nan=False, allow_subnormal=False),
    min_size=1,
    max_size=3,
)


@settings(max_examples=examples(50))
@given(recipe=recipes, values=input_values)
def test_random_graphs_match_jax(recipe, values):
    inputs = [graph.variable(v, name=f"x{k}") for k, v in enumerate(values)]
    out = evaluate_recipe(recipe, inputs, GRAPH_LIB)
    assume(all(abs(node.value) < 1e100 for node in graph.topological_order(out)))
    grads = graph.backward(out)

    def f(*xs):
        return evaluate_recipe(recipe, xs, JAX_LIB)

    xs = [f64(v) for v in values]
    assert_close(out.value, f(*xs))
    reference = jax.grad(f, argnums=tuple(range(len(xs))))(*xs)
    assert_close([grads.get(x, 0.0) for x in inputs], reference)


# --- Local derivatives (the extended graph G') ---

UNARY = {
    "neg": (graph.neg, jnp.negative),
    "square": (graph.square, jnp.square),
    "exp": (graph.exp, jnp.exp),
    "log": (graph.log, jnp.log),
    "identity": (graph.identity, lambda u: u),
}
BINARY = {
    "add": (lambda u, v: u + v, jnp.add),
    "mul": (lambda u, v: u * v, jnp.multiply),
    "div": (lambda u, v: u / v, jnp.divide),
}


@pytest.mark.parametrize("op", sorted(UNARY))
@pytest.mark.parametrize("value", [0.7, 2.5, 1e-3])
def test_unary_local_grads_match_jax(op, value):
    ours, reference = UNARY[op]
    x = graph.variable(value, name="x")
    u = ours(x)
    assert u.op == op
    assert u.parents == (x,)
    assert_close(u.value, reference(f64(value)))
    assert_close(u.local_grads[x], jax.grad(reference)(f64(value)))


@pytest.mark.parametrize("op", sorted(BINARY))
@pytest.mark.parametrize("values", [(0.7, -1.3), (2.5, 0.25)])
def test_binary_local_grads_match_jax(op, values):
    ours, reference = BINARY[op]
    x, y = graph.variable(values[0], "x"), graph.variable(values[1], "y")
    u = ours(x, y)
    assert u.op == op
    assert u.parents == (x, y)
    args = [f64(v) for v in values]
    assert_close(u.value, reference(*args))
    dx, dy = jax.grad(reference, argnums=(0, 1))(*args)
    assert_close([u.local_grads[x], u.local_grads[y]], [dx, dy])
    assert graph.edges(u) == [(x, u, u.local_grads[x]), (y, u, u.local_grads[y])]


def test_edges_list_every_local_derivative():
    a, b = graph.variable(2.0, "a"), graph.variable(3.0, "b")
    ab = a * b
    f = ab + a
    assert graph.edges(f) == [(a, ab, 3.0), (b, ab, 2.0), (ab, f, 1.0), (a, f, 1.0)]


# --- Structure: parents, successors, shared nodes ---


def test_parents_and_successors():
    a, b = graph.variable(2.0, "a"), graph.variable(3.0, "b")
    ab = a * b
    f = ab + a
    assert a.parents == () and b.parents == ()
    assert ab.parents == (a, b)
    assert f.parents == (ab, a)
    assert a.successors == (ab, f)
    assert b.successors == (ab,)
    assert ab.successors == (f,)
    assert f.successors == ()
    assert graph.topological_order(f) == [a, b, ab, f]


def test_shared_subexpression():
    """f = a·b + a: a reaches f by two paths, whose derivatives add up."""
    a, b = graph.variable(2.0, "a"), graph.variable(3.0, "b")
    f = a * b + a
    grads = graph.backward(f)
    assert f.value == 8.0
    assert grads[a] == 4.0  # b + 1
    assert grads[b] == 2.0  # a
    assert grads[f] == 1.0


def test_node_used_twice_by_one_operation():
    x = graph.variable(3.0, "x")
    f = x * x
    assert f.parents == (x, x)
    assert x.successors == (f,)  # one successor, reached by two edges
    assert f.local_grads == {x: 6.0}  # ∂(x·x)/∂x = x + x
    assert graph.backward(f)[x] == 6.0
    g = x / x
    assert g.local_grads[x] == 0.0
    assert graph.backward(g)[x] == 0.0


def test_chain_of_10000_nodes_needs_no_recursion():
    x = graph.variable(0.5, "x")
    u = x
    for k in range(10_000):
        u = graph.identity(u) if k % 2 else -u
    order = graph.topological_order(u)
    assert len(order) == 10_001 > sys.getrecursionlimit()
    grads = graph.backward(u)
    assert len(grads) == 10_001
    assert grads[x] == 1.0  # 5,000 negations
    assert u.value == 0.5
    x.value = -2.0
    assert graph.forward(u) == -2.0
    assert graph.to_dot(u).count("->") == 10_000


def test_many_paths_cost_one_visit_per_node():
    """200 diamonds in a row: 2^200 paths, so path enumeration would never end."""
    x = graph.variable(1.0, "x")
    u = x
    for _ in range(200):
        u = graph.identity(u) + graph.neg(-u)
    grads = graph.backward(u)
    assert len(grads) == 1 + 4 * 200
    assert grads[x] == 2.0**200
    assert u.value == 2.0**200


def test_backward_ignores_nodes_outside_the_output_graph():
    a = graph.variable(2.0, "a")
    f = graph.square(a)
    other = graph.exp(a)  # another successor of a, not used by f
    grads = graph.backward(f)
    assert a.successors == (f, other)
    assert other not in grads
    assert grads[a] == 4.0


def test_backward_of_a_leaf():
    a = graph.variable(2.0, "a")
    assert graph.backward(a) == {a: 1.0}


def test_forward_recomputes_values_and_local_grads():
    nodes = graph.linear_regression([0.65, 1.19], [0.2, 0.7], 1.0)
    L = nodes["L"]
    nodes["w1"].value = 1.0
    nodes["w2"].value = 0.0
    assert graph.forward(L) == pytest.approx(0.64, rel=1e-12)  # (0.2 − 1)²
    assert L.local_grads[nodes["r"]] == pytest.approx(-1.6, rel=1e-12)
    assert graph.backward(L)[nodes["w1"]] == pytest.approx(-0.32, rel=1e-12)


# --- Building rules and errors ---


def test_python_numbers_become_constant_leaves():
    x = graph.variable(2.0, "x")
    for f in (2.0 * x, x * 2, x + 2, 2 + x, x / 2, 2 / x):
        (constant,) = [p for p in f.parents if p is not x]
        assert constant.op == "constant"
        assert constant.value == 2.0
        assert constant.parents == ()
    assert graph.backward(3 * x)[x] == 3.0


def test_subtraction_is_built_as_adding_a_negation():
    x, y = graph.variable(5.0, "x"), graph.variable(3.0, "y")
    f = x - y
    assert f.op == "add"
    assert f.parents[0] is x
    assert f.parents[1].op == "neg" and f.parents[1].parents == (y,)
    assert f.value == 2.0
    grads = graph.backward(f)
    assert (grads[x], grads[y]) == (1.0, -1.0)
    g = 1 - x
    assert g.value == -4.0 and graph.backward(g)[x] == -1.0


def test_square_power():
    x = graph.variable(3.0, "x")
    f = x**2
    assert f.op == "square" and f.value == 9.0 and f.local_grads == {x: 6.0}


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda x: x**3, "only exponent 2"),
        (lambda x: x**0.5, "only exponent 2"),
        (lambda x: 2**x, "not an operation of OP"),
        (lambda x: x**x, "only exponent 2"),
        (lambda x: x < 1.0, "no order"),
        (lambda x: x >= x, "no order"),
        (lambda x: x == 1.0, "compare node.value"),
        (lambda x: x + "1", "must be a Node or a real number, got str"),
        (lambda x: x * [1.0], "must be a Node or a real number, got list"),
        (lambda x: x + True, "got bool"),
        (lambda x: graph.exp("x"), "got str"),
        (lambda x: math.sin(x), "must be real number"),
        (lambda x: x // 2, "unsupported operand"),
    ],
)
def test_rejected_operations(build, match):
    x = graph.variable(2.0, "x")
    with pytest.raises(TypeError, match=match):
        build(x)


def test_error_messages_list_the_allowed_operations():
    x = graph.variable(2.0, "x")
    with pytest.raises(TypeError) as info:
        x**3
    for op in ("neg", "square", "exp", "log", "identity", "x + y", "x * y", "x / y"):
        assert op in str(info.value)


@pytest.mark.parametrize("value", ["1.0", None, True, [1.0]])
def test_leaves_need_real_numbers(value):
    with pytest.raises(TypeError, match=r"variable\(value\): value must be a real"):
        graph.variable(value)


@pytest.mark.parametrize(
    "function", [graph.backward, graph.forward, graph.edges, graph.to_dot]
)
def test_graph_functions_need_a_node(function):
    with pytest.raises(TypeError, match="out must be a Node, got float"):
        function(1.0)


def test_nodes_compare_by_identity_and_are_hashable():
    x, y = graph.variable(1.0), graph.variable(1.0)
    assert x == x and x != y
    assert len({x, y, x}) == 2


# --- IEEE special values, as jax.numpy in float64 ---


@pytest.mark.parametrize(
    "op, values",
    [
        ("log", (0.0,)),  # -inf, derivative inf
        ("log", (-1.0,)),  # nan, derivative -1
        ("exp", (1000.0,)),  # inf (math.exp would raise OverflowError)
        ("div", (1.0, 0.0)),  # inf
        ("div", (-1.0, 0.0)),  # -inf
        ("div", (1.0, -0.0)),  # -inf
        ("div", (0.0, 0.0)),  # nan
    ],
)
def test_special_values_follow_ieee_like_jax(op, values):
    ours, reference = {**UNARY, **BINARY}[op]
    leaves = [graph.variable(v) for v in values]
    u = ours(*leaves)
    args = [f64(v) for v in values]
    np.testing.assert_array_equal(u.value, reference(*args))
    argnums = tuple(range(len(args)))
    expected = jax.grad(reference, argnums=argnums)(*args)
    np.testing.assert_array_equal([u.local_grads[p] for p in leaves], expected)


def test_log_of_zero_in_a_graph():
    x = graph.variable(0.0, "x")
    f = graph.log(graph.square(x))
    assert f.value == -math.inf
    assert math.isnan(graph.backward(f)[x])  # inf · 0, as in JAX
    assert math.isnan(jax.grad(lambda x: jnp.log(jnp.square(x)))(f64(0.0)))


# --- Looking at the graph: table, DOT, render ---


def test_table_lists_every_node():
    a, b = graph.variable(2.0, "a"), graph.variable(3.0, "b")
    f = a * b + a
    f.name = "f"
    lines = graph.table(f).splitlines()
    assert len(lines) == 2 + 4
    assert lines[2] == "| 0 | a | variable |  | 2 | 4 |"
    assert lines[4] == "| 2 | · | mul | 0, 1 | 6 | 1 |"
    assert lines[5] == "| 3 | f | add | 2, 0 | 8 | 1 |"


def test_to_dot_has_nodes_values_gradients_and_edges():
    a, b = graph.variable(2.0, "a"), graph.variable(3.0, "b")
    f = a * b + a
    f.name = 'f "out"'
    dot = graph.to_dot(f)
    assert dot.startswith("digraph G {") and dot.rstrip().endswith("}")
    assert 'n0 [label="a\\nvalue = 2\\ngrad = 4", shape=box];' in dot
    assert 'n1 [label="b\\nvalue = 3\\ngrad = 2", shape=box];' in dot
    assert 'n2 [label="·\\nvalue = 6\\ngrad = 1", shape=ellipse];' in dot
    assert 'label="f \\"out\\"\\nvalue = 8\\ngrad = 1"' in dot
    for edge in ('n0 -> n2 [label="3"]', 'n1 -> n2 [label="2"]'):
        assert edge in dot
    for edge in ('n2 -> n3 [label="1"]', 'n0 -> n3 [label="1"]'):
        assert edge in dot
    assert dot.count("->") == len(graph.edges(f)) == 4


def test_to_dot_marks_constants():
    x = graph.variable(1.0, "x")
    dot = graph.to_dot(2.0 * x)
    assert 'label="2\\nvalue = 2\\ngrad = 1", shape=box, style=dashed' in dot


def test_render_without_dot_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    x = graph.variable(1.0, "x")
    with pytest.raises(FileNotFoundError, match="Graphviz `dot` program"):
        graph.render(graph.exp(x), tmp_path / "g.svg")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot not installed")
def test_render_with_dot(tmp_path):
    x = graph.variable(1.0, "x")
    path = graph.render(graph.exp(x), tmp_path / "g.svg")
    assert path.read_text().lstrip().startswith(("<?xml", "<svg"))
