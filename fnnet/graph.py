"""Scalar computational graphs with reverse-mode derivatives.

See docs/derivation.md#computational-graph (eq. 22) and #worked-examples.

A computational graph is a DAG whose nodes are scalar variables. Every node is
either a leaf (a `variable` or a `constant`) or the result of ONE operation of

    OP1 = {-x, x², e^x, log x, x}     (neg, square, exp, log, identity)
    OP2 = {x + y, x · y, x / y}        (add, mul, div)

applied to its parents `Pa(u)` (`node.parents`). The nodes built from `u` are
its successors `S(u)` (`node.successors`). Each node also stores the local
partial derivatives ∂u/∂p of its operation with respect to each parent p
(`node.local_grads`): this is the extended graph G'.

`backward(out)` applies the multivariate chain rule (docs/derivation.md eq. 22)
once per node, in reverse topological order:

    du_n/du_j = Σ_{u_i ∈ S(u_j)} du_n/du_i · ∂u_i/∂u_j

so the cost is linear in the number of edges, never in the number of paths.
Graph walks are iterative, so a chain of 10,000 nodes does not reach Python's
recursion limit.

Building graphs:

- Python operators build nodes: `x + y`, `x * y`, `x / y`, `-x` and `x ** 2`
  (the same as `square(x)`). `x - y` is not an operation of OP: it is built as
  `x + (-y)`, a `neg` node followed by an `add` node.
- Named constructors: `neg`, `square`, `exp`, `log`, `identity`.
- A Python number next to a node becomes a `constant` leaf node.
- Anything else raises `TypeError` naming the allowed operations: other powers
  (`x ** 3`), `math.sin(x)`, `x // y`, ordering (`x < y`) and `==` against
  anything but a node (`==` between nodes is identity).

Floating point: values are Python floats (IEEE 754 doubles) and follow the
same special values as `jax.numpy` in float64, with no exception raised:
`log(0) = -inf`, `log(x) = nan` for x < 0, `x / 0 = ±inf` (`0 / 0 = nan`), and
`exp` overflows to `inf`. Local derivatives follow the same rules, e.g.
∂log(x)/∂x = 1/x = inf at x = 0, as `jax.grad(jnp.log)(0.0)`.

Example:
    >>> from fnnet import graph
    >>> a = graph.variable(2.0, name="a")
    >>> b = graph.variable(3.0, name="b")
    >>> f = a * b + a
    >>> f.value
    8.0
    >>> grads = graph.backward(f)
    >>> grads[a], grads[b]
    (4.0, 2.0)
"""

from __future__ import annotations

import math
import numbers
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "ALLOWED_OPS",
    "Node",
    "variable",
    "constant",
    "neg",
    "square",
    "exp",
    "log",
    "identity",
    "topological_order",
    "forward",
    "backward",
    "edges",
    "table",
    "to_dot",
    "render",
    "linear_regression",
    "softmax_regression",
]

ALLOWED_OPS = (
    "-x (neg), x ** 2 (square), exp(x), log(x), identity(x), x + y, x * y, "
    "x / y; x - y is built as x + (-y)"
)


# --- IEEE arithmetic, as jax.numpy in float64 (Python's math raises instead) ---


def _div(x: float, y: float) -> float:
    if y != 0.0:
        return x / y
    if x == 0.0 or math.isnan(x):
        return math.nan
    return math.copysign(math.inf, x) * math.copysign(1.0, y)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _log(x: float) -> float:
    if x > 0.0:
        return math.log(x)
    return -math.inf if x == 0.0 else math.nan


# --- The operations of OP, each next to its local partial derivatives ---


class _Op(NamedTuple):
    symbol: str  # shown in tables and DOT labels
    value: Callable[..., float]
    partials: Callable[..., tuple[float, ...]]  # ∂u/∂(each parent), same order


_OPS: dict[str, _Op] = {
    "neg": _Op("-x", lambda x: -x, lambda x: (-1.0,)),
    "square": _Op("x²", lambda x: x * x, lambda x: (2.0 * x,)),
    "exp": _Op("exp", _exp, lambda x: (_exp(x),)),
    "log": _Op("log", _log, lambda x: (_div(1.0, x),)),
    "identity": _Op("id", lambda x: x, lambda x: (1.0,)),
    "add": _Op("+", lambda x, y: x + y, lambda x, y: (1.0, 1.0)),
    "mul": _Op("·", lambda x, y: x * y, lambda x, y: (y, x)),
    "div": _Op("/", _div, lambda x, y: (_div(1.0, y), -x * _div(1.0, y * y))),
}


class Node:
    """One scalar variable of a computational graph.

    Build nodes with `variable`, `constant`, the operation functions of this
    module, or Python operators; do not call `Node` directly.

    Attributes:
      value: the node's value, a float.
      op: "variable", "constant", or an operation name of OP ("neg", "square",
        "exp", "log", "identity", "add", "mul", "div").
      name: optional label for tables and DOT output (may be reassigned).
      parents: Pa(u), the operands in order; `x * x` has parents `(x, x)`.
      local_grads: dict parent -> ∂u/∂parent. A parent that appears twice has
        the sum of its two partials: `x * x` gives `{x: 2 x}`.
    """

    __slots__ = ("value", "op", "name", "parents", "local_grads", "_successors")

    def __init__(self, op: str, parents: tuple[Node, ...] = (), value: float = 0.0):
        self.value = value
        self.op = op
        self.name: str | None = None
        self.parents = parents
        self.local_grads: dict[Node, float] = {}
        self._successors: list[Node] = []
        for parent in dict.fromkeys(parents):  # x * x is one successor of x
            parent._successors.append(self)
        if parents:
            self._evaluate()

    @property
    def successors(self) -> tuple[Node, ...]:
        """S(u): every node built with this one as an operand, in build order."""
        return tuple(self._successors)

    def _evaluate(self) -> None:
        """Recomputes value and local derivatives from the parents' values."""
        op = _OPS[self.op]
        values = [p.value for p in self.parents]
        self.value = op.value(*values)
        self.local_grads = {}
        for parent, partial in zip(self.parents, op.partials(*values), strict=True):
            self.local_grads[parent] = self.local_grads.get(parent, 0.0) + partial

    @property
    def label(self) -> str:
        """The name if there is one, else the operation symbol or a constant."""
        if self.name is not None:
            return self.name
        if self.op in _OPS:
            return _OPS[self.op].symbol
        return f"{self.value:g}" if self.op == "constant" else "variable"

    def __repr__(self) -> str:
        name = "" if self.name is None else f"name={self.name!r}, "
        return f"Node({name}op={self.op!r}, value={self.value!r})"

    # Operators of OP2 and -x, x ** 2.
    def __add__(self, other: Node | float) -> Node:
        return Node("add", (self, _as_node(other, "+")))

    def __radd__(self, other: float) -> Node:
        return Node("add", (_as_node(other, "+"), self))

    def __mul__(self, other: Node | float) -> Node:
        return Node("mul", (self, _as_node(other, "*")))

    def __rmul__(self, other: float) -> Node:
        return Node("mul", (_as_node(other, "*"), self))

    def __truediv__(self, other: Node | float) -> Node:
        return Node("div", (self, _as_node(other, "/")))

    def __rtruediv__(self, other: float) -> Node:
        return Node("div", (_as_node(other, "/"), self))

    def __neg__(self) -> Node:
        return Node("neg", (self,))

    def __sub__(self, other: Node | float) -> Node:
        return self + neg(_as_node(other, "-"))

    def __rsub__(self, other: float) -> Node:
        return _as_node(other, "-") + neg(self)

    def __pow__(self, exponent: object) -> Node:
        if isinstance(exponent, numbers.Real) and exponent == 2:
            return square(self)
        raise TypeError(
            f"x ** exponent: only exponent 2 (square) is an operation of OP, got "
            f"{exponent!r}. Allowed operations: {ALLOWED_OPS}."
        )

    def __rpow__(self, base: object) -> Node:
        raise TypeError(
            f"{base!r} ** node is not an operation of OP. "
            f"Allowed operations: {ALLOWED_OPS}."
        )

    # A node is not a number: refuse comparisons that would need one.
    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Node):
            return self is other
        raise TypeError(
            f"Cannot compare a Node with {type(other).__name__}: `==` between "
            "nodes is identity; compare node.value to test values."
        )

    def _unordered(self, other: object) -> bool:
        raise TypeError(
            "Nodes have no order (<, <=, >, >= are not operations of OP); "
            "compare node.value instead."
        )

    __lt__ = __le__ = __gt__ = __ge__ = _unordered


def _as_node(x: object, operator: str) -> Node:
    """Returns x if it is a node, a constant node if it is a real number."""
    if isinstance(x, Node):
        return x
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return constant(x)
    raise TypeError(
        f"Operand of {operator!r} must be a Node or a real number, got "
        f"{type(x).__name__} {x!r}. Allowed operations: {ALLOWED_OPS}."
    )


def _leaf(value: object, op: str, name: str | None) -> Node:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"{op}(value): value must be a real number, got "
            f"{type(value).__name__} {value!r}."
        )
    node = Node(op, value=float(value))
    node.name = name
    return node


def variable(value: float, name: str | None = None) -> Node:
    """A leaf node: an input or parameter, e.g. `variable(0.65, name="w1")`."""
    return _leaf(value, "variable", name)


def constant(value: float, name: str | None = None) -> Node:
    """A leaf node for a fixed number (Python numbers in expressions become these)."""
    return _leaf(value, "constant", name)


def _unary(op: str, x: Node | float, name: str | None) -> Node:
    node = Node(op, (_as_node(x, op),))
    node.name = name
    return node


def neg(x: Node | float, name: str | None = None) -> Node:
    """-x, with ∂/∂x = -1."""
    return _unary("neg", x, name)


def square(x: Node | float, name: str | None = None) -> Node:
    """x², with ∂/∂x = 2x."""
    return _unary("square", x, name)


def exp(x: Node | float, name: str | None = None) -> Node:
    """e^x, with ∂/∂x = e^x (inf on overflow)."""
    return _unary("exp", x, name)


def log(x: Node | float, name: str | None = None) -> Node:
    """Natural log, with ∂/∂x = 1/x (log 0 = -inf, log of x < 0 = nan)."""
    return _unary("log", x, name)


def identity(x: Node | float, name: str | None = None) -> Node:
    """x, as a new node, with ∂/∂x = 1."""
    return _unary("identity", x, name)


# --- Walking the graph ---


def topological_order(out: Node) -> list[Node]:
    """Every node that `out` depends on, each after all of its parents.

    Iterative depth-first search over parents (no recursion), so deep chains
    are fine. The last node is `out`.
    """
    _check_node(out, "out")
    order: list[Node] = []
    seen: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(out, False)]
    while stack:
        node, parents_done = stack.pop()
        if parents_done:
            order.append(node)
        elif node not in seen:
            seen.add(node)
            stack.append((node, True))
            # Reversed, so that the first operand is visited (and listed) first.
            stack.extend((p, False) for p in reversed(node.parents) if p not in seen)
    return order


def forward(out: Node) -> float:
    """Recomputes every node `out` depends on, in topological order.

    Values are computed when nodes are built; call this after assigning new
    values to leaves (`w.value = 0.5`).

    Returns:
      The new `out.value`.
    """
    for node in topological_order(out):
        if node.parents:
            node._evaluate()
    return out.value


def backward(out: Node) -> dict[Node, float]:
    """Derivatives of `out` with respect to every node it depends on.

    Reverse mode (docs/derivation.md eq. 22): grad[out] = 1, then for each
    other node u_j in reverse topological order,
    grad[u_j] = Σ_{u_i ∈ S(u_j)} grad[u_i] ∂u_i/∂u_j.
    Successors that `out` does not depend on contribute 0 and are skipped.

    Args:
      out: the output node u_n.

    Returns:
      dict node -> d out / d node for `out` and all its ancestors; a node that
      `out` does not depend on is absent (its derivative is 0).
    """
    order = topological_order(out)
    grads = {out: 1.0}
    for node in reversed(order[:-1]):
        # Successors inside out's graph come later in `order`, so they are done.
        grads[node] = sum(
            grads[s] * s.local_grads[node] for s in node._successors if s in grads
        )
    return grads


def edges(out: Node) -> list[tuple[Node, Node, float]]:
    """The extended graph G': (parent, child, ∂child/∂parent) for every edge.

    One edge per distinct (parent, child) pair, children in topological order.
    """
    return [
        (parent, node, partial)
        for node in topological_order(out)
        for parent, partial in node.local_grads.items()
    ]


def _check_node(x: object, argument: str) -> None:
    if not isinstance(x, Node):
        raise TypeError(f"{argument} must be a Node, got {type(x).__name__} {x!r}.")


def _grads_or_backward(out: Node, grads: dict[Node, float] | None) -> dict[Node, float]:
    return backward(out) if grads is None else grads


# --- Looking at the graph ---


def table(out: Node, grads: dict[Node, float] | None = None) -> str:
    """A Markdown table of every node: operation, parents, value, d out/d node.

    Args:
      out: the output node.
      grads: derivatives from `backward(out)`; computed if None.

    Returns:
      The table, one row per node in topological order, numbered from 0.
    """
    grads = _grads_or_backward(out, grads)
    order = topological_order(out)
    index = {node: i for i, node in enumerate(order)}
    rows = [
        "| # | node | op | parents | value | d out / d node |",
        "|---|---|---|---|---|---|",
    ]
    for i, node in enumerate(order):
        parents = ", ".join(str(index[p]) for p in node.parents)
        rows.append(
            f"| {i} | {node.label} | {node.op} | {parents} | {node.value:.6g} "
            f"| {grads.get(node, 0.0):.6g} |"
        )
    return "\n".join(rows) + "\n"


def _dot_label(*lines: str) -> str:
    """A quoted DOT label, one line per argument."""
    escaped = (line.replace("\\", "\\\\").replace('"', '\\"') for line in lines)
    return '"' + "\\n".join(escaped) + '"'


def to_dot(out: Node, grads: dict[Node, float] | None = None) -> str:
    """Graphviz DOT text of the extended graph G'.

    Nodes show their label, value and derivative d out / d node; edges go from
    parent to child and show the local derivative ∂child/∂parent. Variables are
    boxes, constants dashed boxes, operations ellipses.

    Args:
      out: the output node.
      grads: derivatives from `backward(out)`; computed if None.

    Returns:
      The DOT source, e.g. for `dot -Tsvg` or `render`.
    """
    grads = _grads_or_backward(out, grads)
    order = topological_order(out)
    index = {node: i for i, node in enumerate(order)}
    shapes = {"variable": "shape=box", "constant": "shape=box, style=dashed"}
    lines = ["digraph G {", "  rankdir=LR;"]
    for node, i in index.items():
        label = _dot_label(
            node.label,
            f"value = {node.value:.4g}",
            f"grad = {grads.get(node, 0.0):.4g}",
        )
        shape = shapes.get(node.op, "shape=ellipse")
        lines.append(f"  n{i} [label={label}, {shape}];")
    for parent, child, partial in edges(out):
        lines.append(f'  n{index[parent]} -> n{index[child]} [label="{partial:.4g}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(
    out: Node,
    path: str | Path,
    grads: dict[Node, float] | None = None,
    *,
    format: str = "svg",
) -> Path:
    """Draws the graph to an image file with the Graphviz `dot` program.

    Args:
      out: the output node.
      path: the image file to write.
      grads: derivatives from `backward(out)`; computed if None.
      format: any `dot -T` output format, e.g. "svg", "png", "pdf".

    Returns:
      The path written.

    Raises:
      FileNotFoundError: if the `dot` program is not installed; `to_dot(out)`
        still gives the DOT text.
    """
    dot = shutil.which("dot")
    if dot is None:
        raise FileNotFoundError(
            "render needs the Graphviz `dot` program, which is not on PATH. "
            "Install Graphviz (e.g. `apt-get install graphviz`), or write "
            "to_dot(out) to a .dot file and render it elsewhere."
        )
    path = Path(path)
    subprocess.run(
        [dot, f"-T{format}", "-o", str(path)],
        input=to_dot(out, grads),
        text=True,
        check=True,
    )
    return path


# --- The worked examples (docs/derivation.md#worked-examples) ---


def _total(nodes: Sequence[Node], name: str | None = None) -> Node:
    total = nodes[0]
    for node in nodes[1:]:
        total = total + node
    if name is not None:
        total.name = name
    return total


def linear_regression(
    w: Sequence[float], x: Sequence[float], y: float
) -> dict[str, Node]:
    """Worked example 1: squared error L = (wᵀx − y)² of a linear model.

    Built from OP as yhat = Σ_k w_k · x_k, r = yhat + (−y), L = r².

    Args:
      w: (D,) weights.
      x: (D,) input.
      y: the target.

    Returns:
      Named nodes: leaves "w1".."wD", "x1".."xD", "y", and "yhat", "r", "L".
    """
    if len(w) != len(x):
        raise ValueError(
            f"w and x must have the same length, got len(w)={len(w)} and "
            f"len(x)={len(x)}."
        )
    nodes = {f"w{k}": variable(v, f"w{k}") for k, v in enumerate(w, 1)}
    nodes |= {f"x{k}": variable(v, f"x{k}") for k, v in enumerate(x, 1)}
    nodes["y"] = variable(y, "y")
    products = [nodes[f"w{k}"] * nodes[f"x{k}"] for k in range(1, len(w) + 1)]
    nodes["yhat"] = _total(products, "yhat")
    nodes["r"] = _total([nodes["yhat"], neg(nodes["y"], "-y")], "r")
    nodes["L"] = square(nodes["r"], "L")
    return nodes


def softmax_regression(
    W: Sequence[Sequence[float]],
    x: Sequence[float],
    b: Sequence[float],
    y: Sequence[float],
) -> dict[str, Node]:
    """Worked example 2: softmax regression with cross-entropy.

    z_i = Σ_k W_ik x_k + b_i,  h_i = e^{z_i},  H = Σ_j h_j,  yhat_i = h_i / H,
    L = −Σ_i y_i log yhat_i.  For one-hot y, dL/db_i = yhat_i − y_i.

    Args:
      W: (K, D) weights, a list of rows.
      x: (D,) input.
      b: (K,) biases.
      y: (K,) target distribution (one-hot in the worked example).

    Returns:
      Named nodes: leaves "W11".."WKD", "x1".., "b1".., "y1"..; and "z1"..,
      "h1"..,"H", "yhat1"..,"L".
    """
    K, D = len(W), len(x)
    if any(len(row) != D for row in W) or len(b) != K or len(y) != K:
        raise ValueError(
            f"Expected W of shape (K, D), x (D,), b (K,), y (K,); got W rows of "
            f"lengths {[len(row) for row in W]}, len(x)={D}, len(b)={len(b)}, "
            f"len(y)={len(y)}."
        )
    classes, inputs = range(1, K + 1), range(1, D + 1)
    n = {
        f"W{i}{k}": variable(W[i - 1][k - 1], f"W{i}{k}")
        for i in classes
        for k in inputs
    }
    n |= {f"x{k}": variable(x[k - 1], f"x{k}") for k in inputs}
    n |= {f"b{i}": variable(b[i - 1], f"b{i}") for i in classes}
    n |= {f"y{i}": variable(y[i - 1], f"y{i}") for i in classes}
    for i in classes:
        terms = [n[f"W{i}{k}"] * n[f"x{k}"] for k in inputs] + [n[f"b{i}"]]
        n[f"z{i}"] = _total(terms, f"z{i}")
        n[f"h{i}"] = exp(n[f"z{i}"], f"h{i}")
    n["H"] = _total([n[f"h{i}"] for i in classes], "H")
    for i in classes:
        n[f"yhat{i}"] = n[f"h{i}"] / n["H"]
        n[f"yhat{i}"].name = f"yhat{i}"
    log_likelihood = _total([n[f"y{i}"] * log(n[f"yhat{i}"]) for i in classes])
    n["L"] = neg(log_likelihood, "L")
    return n
