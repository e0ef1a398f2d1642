"""Matrix-product precision: checked at the front, present on every product.

The oracle is the traced program itself: every ``dot_general`` in the jaxpr
of the forward pass, the hand backward, ``jax.grad`` of the cost, the
custom-VJP cost and a whole training epoch carries the network's precision
(a user block's own product included). On a CPU the choice does not change
the numbers, so the program, not the result, is what can be checked here.
"""

import jax
import jax.numpy as jnp
import pytest

import fnnet
from fnnet import train
from fnnet.cli import main

P = jax.lax.Precision


def _residual():
    """A user block with its own product, written without any precision."""

    def fwd(p, x):
        u = x @ p["V"].T
        return x + jnp.tanh(u), (x, u)

    def bwd(p, cache, dy):
        x, u = cache
        du = (1 - jnp.tanh(u) ** 2) * dy
        rows = tuple(range(du.ndim - 1))
        return {"V": jnp.tensordot(du, x, axes=(rows, rows))}, dy + du @ p["V"]

    def init(key, width, dtype):
        return {"V": jax.random.normal(key, (width, width), dtype) / width}

    return fnnet.Block("residual", fwd, bwd, init)


RESIDUAL = _residual()


def _dot_precisions(jaxpr):
    """The precision parameter of every dot_general, nested jaxprs included."""
    found = []

    def walk(j):
        j = getattr(j, "jaxpr", j)  # a ClosedJaxpr holds its Jaxpr
        for eqn in j.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn.params["precision"])
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                        walk(sub)

    walk(jaxpr)
    return found


def _programs(net):
    """jaxprs of every path a network's products take, and how many products."""
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float32)
    y = jnp.asarray([0, 1, 2, 0, 1, 2])
    key = jax.random.key(2)
    cfg = train.TrainConfig(epochs=1, batch_size=3)
    state = train.init_state(params, None)
    return {
        "forward": jax.make_jaxpr(lambda p: net.forward(p, x))(params),
        "backprop": jax.make_jaxpr(lambda p: net.backprop(p, x, y, key=key))(params),
        "jax.grad": jax.make_jaxpr(jax.grad(lambda p: net.cost(p, x, y)))(params),
        "hand_cost": jax.make_jaxpr(jax.grad(lambda p: net.hand_cost(p, x, y)))(params),
        "per_example": jax.make_jaxpr(lambda p: net.per_example_grads(p, x, y))(params),
        "epoch": jax.make_jaxpr(
            lambda s: train.run_epoch(net, cfg, None, s, x, y, key)
        )(state),
    }


@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, None), ("default", P.DEFAULT), ("high", P.HIGH), (P.HIGHEST, P.HIGHEST)],
)
def test_precision_reaches_every_matrix_product(given, expected):
    net = fnnet.MLP(
        (3, 5, 5, 3),
        (RESIDUAL, "tanh"),
        "softmax",
        "cross_entropy",
        keep_prob=0.9,
        precision=given,
    )
    for path, jaxpr in _programs(net).items():
        found = _dot_precisions(jaxpr)
        # forward: 3 affine products and the block's; backward: 5 more at least.
        assert len(found) >= (4 if path == "forward" else 8), (path, found)
        want = None if expected is None else (expected, expected)
        assert all(p == want for p in found), (path, found)


def test_precision_is_checked_named_and_described():
    base = fnnet.MLP((3, 4, 2))
    high = fnnet.MLP((3, 4, 2), precision=P.HIGH)
    assert base.precision is None and "precision" not in base.describe()
    assert high.precision == "high" and high.describe()["precision"] == "high"
    assert high == fnnet.MLP((3, 4, 2), precision="high")
    assert len({base, high}) == 2  # two networks, two compilations
    for bad in ("fast", "HIGHEST", 3, "tensorfloat32"):
        with pytest.raises(ValueError, match="precision must be None, one of"):
            fnnet.MLP((3, 4, 2), precision=bad)


def test_gradcheck_compares_at_highest_and_says_so():
    net = fnnet.MLP((3, 4, 2), "tanh", precision="default")
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float32)
    y = jax.random.normal(jax.random.key(2), (5, 2), jnp.float32)
    report = fnnet.gradcheck(net, params, x, y, fd=False)
    assert report.precision == "highest"
    assert "matmul precision highest" in str(report)
    own = fnnet.gradcheck(net, params, x, y, fd=False, precision=net.precision)
    assert own.precision == "default"
    with pytest.raises(ValueError, match="precision must be None"):
        fnnet.gradcheck(net, params, x, y, precision="exact")


def test_cli_precision_flag(capsys):
    # fnnet train --precision: tests/test_cli.py's resume test trains with it.
    args = ["gradcheck", "--sizes", "3,2", "--dtype", "float32"]
    assert main([*args, "--precision", "high"]) == 0
    assert "matmul precision high;" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        main([*args, "--precision", "tf32"])
    assert err.value.code == 2
    assert "--precision: invalid choice: 'tf32'" in capsys.readouterr().err


def test_precision_reaches_per_example_norms_and_clipping():
    net = fnnet.MLP((3, 5, 3), "tanh", "softmax", "cross_entropy", precision="high")
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float32)
    y = jnp.asarray([0, 1, 2, 0, 1, 2])
    programs = {
        "norms": jax.make_jaxpr(lambda p: net.per_example_norms(p, x, y))(params),
        "clipped": jax.make_jaxpr(lambda p: net.clipped_grads(p, x, y, clip=1.0))(
            params
        ),
    }
    for path, jaxpr in programs.items():
        found = _dot_precisions(jaxpr)
        # forward 2 products, backward: 1 propagation and 2 weight products.
        assert len(found) >= 5, (path, found)
        assert all(p == (P.HIGH, P.HIGH) for p in found), (path, found)
