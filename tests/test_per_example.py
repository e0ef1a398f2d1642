"""Per-example gradient norms and clipping from the batch's rows (eqs. 25-27).

The oracle is ``jax.vmap`` of ``jax.grad`` of one example's own cost (the
gradient of L_i, with that example's rows of the dropout masks), reduced with
NumPy. Everything is float64 and compared to 1e-10. Each group of networks
is traced into ONE compiled function, so the module compiles a few times only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from extensions import HUBER, SWISH

import fnnet
from fnnet import core
from fnnet.activations import HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS

TOL = 1e-10
N = 6
CLIP = 0.3


def reference(net, params, x, y, masks):
    """g_i = dL_i/dtheta for every row i: vmap of jax.grad of one example's cost."""

    def one(xi, yi, mi):
        return jax.grad(lambda p: core.cost(net, p, xi, yi, mi))(params)

    return jax.vmap(one)(x, y, masks)


def run_all(cases):
    """Core results and references for every (net, params, x, y, key), one jit.

    Per case: the reference g_i, per_example_norms, the clipped sum and mean,
    and (for the first case and the last) backprop's gradients and the
    unclipped mean, else None.
    """
    last = len(cases) - 1

    @jax.jit
    def go(arrays):
        out = []
        for i, ((net, *_), (params, x, y, key)) in enumerate(
            zip(cases, arrays, strict=True)
        ):
            masks = core.masks_for(net, key, x) if key is not None else None
            full = i in (0, last)
            out.append(
                (
                    reference(net, params, x, y, masks),
                    core.per_example_norms(net, params, x, y, masks),
                    core.clipped_grads(net, params, x, y, CLIP, masks),
                    core.clipped_grads(net, params, x, y, CLIP, masks, scale=1 / N)
                    if full
                    else None,
                    core.backprop(net, params, x, y, masks).grads if full else None,
                    core.clipped_grads(net, params, x, y, jnp.inf, masks, scale=1 / N)
                    if full
                    else None,
                )
            )
        return out

    # Tiny programs: compiling dominates, so compile less (restored after).
    saved = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        return jax.block_until_ready(go([tuple(c[1:]) for c in cases]))
    finally:
        jax.config.update("jax_disable_most_optimizations", saved)


def np_layer_norms(g) -> np.ndarray:
    """(N, L) per-layer norms of per-example gradients (leading axis N)."""
    cols = []
    for layer in g:
        leaves = [np.asarray(t).reshape(N, -1) for t in jax.tree.leaves(layer)]
        cols.append(np.sqrt(sum(np.sum(t**2, axis=1) for t in leaves)))
    return np.stack(cols, axis=1)


def np_clipped_sum(g, norms):
    c = np.minimum(1.0, CLIP / norms)
    return jax.tree.map(lambda t: np.tensordot(c, np.asarray(t), axes=1), g)


def assert_trees_close(a, b, atol=TOL):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=TOL, atol=atol)


def make_case(net, seed, labels=False, probs=False):
    """(net, params, x, y, dropout key) drawn with NumPy (no compiled kernels)."""
    rng = np.random.default_rng(seed)
    params = tuple(
        {
            "W": jnp.asarray(rng.normal(size=(m, k)) * 1.5 / np.sqrt(k)),
            "b": jnp.asarray(rng.normal(size=m) * 0.1),
        }
        for k, m in zip(net.sizes[:-1], net.sizes[1:], strict=True)
    )
    x = jnp.asarray(rng.normal(size=(N, net.sizes[0])))
    K = net.sizes[-1]
    if labels:
        y = jnp.asarray(rng.integers(0, K, size=N))
    elif probs:
        e = np.exp(rng.normal(size=(N, K)))
        y = jnp.asarray(e / e.sum(axis=1, keepdims=True))
    else:
        y = jnp.asarray(rng.uniform(size=(N, K)))
    drop_key = jax.random.key(seed) if net.keep_prob < 1 else None
    return (net, params, x, y, drop_key)


# One deep network with every hidden activation (and a user's), with dropout;
# one-layer networks with every valid output/loss pair; a relu network with
# dropout.
DEEP = fnnet.MLP(
    (3, *(4,) * (len(HIDDEN_ACTIVATIONS) + 1), 3),
    activation=(*HIDDEN_ACTIVATIONS, SWISH),
    output="softmax",
    loss="cross_entropy",
    keep_prob=0.7,
)
HEADS = [
    *[(out, "mse", {}) for out in OUTPUT_ACTIVATIONS],
    ("sigmoid", "bce", {}),
    ("softmax", "cross_entropy", {"labels": True}),
    ("softmax", "cross_entropy", {"probs": True}),
    ("tanh", HUBER, {}),
]


@pytest.fixture(scope="module")
def results():
    seeds = iter(range(100))
    cases = [make_case(DEEP, next(seeds), labels=True)]
    names = ["deep, every activation, dropout"]
    for out, loss, kw in HEADS:
        net = fnnet.MLP((3, 3), output=out, loss=loss)  # the head is what varies
        cases.append(make_case(net, next(seeds), **kw))
        names.append(
            f"{fnnet.activations.name_of(out)}/{fnnet.activations.name_of(loss)}"
        )
    net = fnnet.MLP((3, 5, 2), activation="relu", keep_prob=0.5)
    cases.append(make_case(net, next(seeds)))
    names.append("relu, mse, dropout")
    return names, run_all(cases)


def test_norms_equal_vmap_grad_norms(results):
    names, outs = results
    for name, (g, norms, *_) in zip(names, outs, strict=True):
        ref = np_layer_norms(g)
        assert ref.shape == norms.layer_norms.shape, name
        np.testing.assert_allclose(
            norms.layer_norms, ref, rtol=TOL, atol=TOL, err_msg=name
        )
        np.testing.assert_allclose(
            norms.norms, np.sqrt(np.sum(ref**2, axis=1)), rtol=TOL, err_msg=name
        )
        # The batch gradient is the mean of the per-example ones.
        assert_trees_close(norms.grads, jax.tree.map(lambda t: t.mean(axis=0), g))
    # Not a vacuous comparison: norms differ across examples and layers.
    deep_norms = np.asarray(outs[0][1].layer_norms)
    assert np.ptp(deep_norms[:, -1]) > 1e-3


def test_clipped_sum_and_mean_equal_clipping_vmap_grads(results):
    names, outs = results
    clipped_any = False
    for name, (g, _, clipped, clipped_mean, *_) in zip(names, outs, strict=True):
        total = np.sqrt(np.sum(np.asarray(np_layer_norms(g)) ** 2, axis=1))
        want = np_clipped_sum(g, total)
        assert_trees_close(clipped.grads, want)
        if clipped_mean is not None:
            mean = jax.tree.map(lambda t: t / N, want)
            assert_trees_close(clipped_mean.grads, mean)
        np.testing.assert_allclose(clipped.norms, total, rtol=TOL, err_msg=name)
        clipped_any |= bool(np.any(total > CLIP)) and bool(np.any(total < CLIP))
        # Every clipped per-example gradient has norm min(||g_i||, C).
        c = np.asarray(clipped.factors)
        np.testing.assert_allclose(c * total, np.minimum(total, CLIP), rtol=TOL)
    assert clipped_any  # some rows clipped and some not, in some case


def test_unclipped_mean_is_backprop_by_the_same_products(results):
    # clip = inf and scale 1/N: c_i = 1 exactly, so the products are those of
    # the batched backward (eq. 14), here on the same platform in one program.
    full = [r for r in zip(*results, strict=True) if r[1][-1] is not None]
    assert len(full) == 2
    for name, (*_, hand, unclipped) in full:
        assert_trees_close(unclipped.grads, hand, atol=1e-15)
        np.testing.assert_array_equal(unclipped.factors, np.ones(N), err_msg=name)


def test_weights_drop_rows():
    net = fnnet.MLP((3, 4, 2), activation="tanh")
    _, params, x, y, _ = make_case(net, 5)
    w = jnp.array([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    keep = np.flatnonzero(np.asarray(w))

    @jax.jit
    def both(params, x, y):
        got = core.clipped_grads(net, params, x, y, CLIP, weights=w).grads
        return got, core.clipped_grads(net, params, x[keep], y[keep], CLIP).grads

    assert_trees_close(*both(params, x, y))


def test_blocks_with_parameters_are_refused():
    block = fnnet.Block(
        "scale",
        lambda p, x: (x * p["s"], (x,)),
        lambda p, cache, dy: ({"s": fnnet.blocks.sum_rows(dy * cache[0], 1)}, dy),
        lambda key, width, dtype: {"s": jnp.ones(width, dtype)},
    )
    net = fnnet.MLP((3, 4, 2), activation=block)
    params = net.init(jax.random.key(0), jnp.float64)
    x = jnp.ones((2, 3), jnp.float64)
    y = jnp.ones((2, 2), jnp.float64)
    with pytest.raises(ValueError, match="hidden block 'scale' of layer 1"):
        core.per_example_norms(net, params, x, y)
    with pytest.raises(ValueError, match="use MLP.per_example_grads"):
        net.per_example_norms(params, x, y)


def test_checked_front():
    # The front validates and calls the core; the per-example gradients of
    # MLP.per_example_grads (vmap of the one-example backward) are the oracle.
    net = fnnet.MLP((3, 4, 2), activation="relu")
    _, params, x, y, _ = make_case(net, 9)
    J, grads, layer_norms, norms = net.per_example_norms(params, x, y)
    _, g = net.per_example_grads(params, x, y)
    np.testing.assert_allclose(layer_norms, np_layer_norms(g), rtol=TOL, atol=TOL)
    assert_trees_close(grads, jax.tree.map(lambda t: t.mean(axis=0), g))
    mean = net.clipped_grads(params, x, y, clip=CLIP, mean=True)
    want = np_clipped_sum(g, np.asarray(norms))
    assert_trees_close(mean.grads, jax.tree.map(lambda t: t / N, want))
    with pytest.raises(ValueError, match="clip must be a number > 0"):
        net.clipped_grads(params, x, y, clip=0.0)
    with pytest.raises(ValueError, match=r"x must be a batch \(N, 3\)"):
        net.per_example_norms(params, x[0], y[0])
    with pytest.raises(ValueError, match="key was given but keep_prob=1.0"):
        net.per_example_norms(params, x, y, key=jax.random.key(0))
