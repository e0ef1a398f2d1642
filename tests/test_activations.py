"""Tests for fnnet.activations: every h against jax.nn, every h' against jax.grad.

The derivative oracle is ``jax.grad`` of the library's own ``h`` (the same
formula, differentiated by JAX) and, for the values, the ``jax.nn`` functions.
Points include the kinks and large |a| in both float32 and float64.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import REFERENCE_H

from fnnet import activations as act
from fnnet.activations import ACTIVATIONS, ELU_ALPHA, LEAKY_SLOPE

NAMES = (
    "identity",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "softplus",
    "elu",
    "gelu",
)

# Independent references for h: jax.nn, not fnnet.
REFERENCE = {k: f for k, f in REFERENCE_H.items() if k != "softmax"}

# Per dtype: (rtol, atol) for values/derivatives of size O(1). atol covers
# the tails where both sides are a few ulps away from 0.
TOL = {jnp.float32: (2e-6, 2e-7), jnp.float64: (1e-13, 1e-15)}

LARGE = (20.0, 40.0, 100.0, 1e4, 1e30)


def points(dtype):
    """Many pre-activations: a fine grid, random points at many scales, large |a|.

    Exact 0 is left out here; the kinks are tested on their own below.
    """
    grid = np.linspace(-12.0, 12.0, 480)  # even count: 0 is not on it
    rng = np.random.default_rng(0)
    scales = np.repeat([1e-8, 1e-3, 0.1, 1.0, 5.0, 30.0], 50)
    rand = rng.standard_normal(scales.size) * scales
    large = np.array(LARGE + tuple(-v for v in LARGE))
    a = np.concatenate([grid, rand, large])
    assert not np.any(a == 0.0)
    return jnp.asarray(a, dtype)


@functools.cache
def evaluate(name, dtype):
    """h, h', jax.grad(h), the jax.nn reference and its jax.grad at ``points``.

    One jit per (name, dtype): eager op-by-op dispatch would compile every
    primitive on its own and cost more than the whole check.
    """
    h, h_prime, ref = ACTIVATIONS[name].h, ACTIVATIONS[name].h_prime, REFERENCE[name]

    @jax.jit
    def run(a):
        return {
            "h": h(a),
            "hand": h_prime(a),
            "auto": jax.vmap(jax.grad(h))(a),
            "ref": ref(a),
            "ref_grad": jax.vmap(jax.grad(ref))(a),
        }

    a = points(dtype)
    out = run(a)
    for value in out.values():
        assert value.dtype == dtype and value.shape == a.shape
    return np.asarray(a), {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", NAMES)
def test_h_prime_matches_jax_grad(name, dtype):
    _, out = evaluate(name, dtype)
    # No NaN and no overflow, also at |a| = 1e4 and 1e30.
    for key in ("h", "hand", "auto"):
        assert np.all(np.isfinite(out[key])), key
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(out["hand"], out["auto"], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", NAMES)
def test_h_matches_jax_nn(name, dtype):
    _, out = evaluate(name, dtype)
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(out["h"], out["ref"], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", NAMES)
def test_h_prime_matches_grad_of_jax_nn(name, dtype):
    """h' also agrees with the derivative of the independent jax.nn function
    (leaky_relu included: jax.nn's x >= 0 branch differs only at 0)."""
    a, out = evaluate(name, dtype)
    # Moderate |a|: jax.nn's own derivatives are not all tail-accurate.
    keep = np.abs(a) < 50
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(
        out["hand"][keep], out["ref_grad"][keep], rtol=100 * rtol, atol=10 * atol
    )


# h'(0) by definition (docs/derivation.md#activations), and the
# conventions at the kinks: relu'(0) = 0 as jax.nn.relu, leaky_relu'(0) = slope
# (strict a > 0 branch), elu'(0) = ELU_ALPHA e^0.
AT_ZERO = {
    "identity": 1.0,
    "sigmoid": 0.25,
    "tanh": 1.0,
    "relu": 0.0,
    "leaky_relu": LEAKY_SLOPE,
    "softplus": 0.5,
    "elu": ELU_ALPHA,
    "gelu": 0.5,
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", NAMES)
def test_h_prime_at_zero(name, dtype):
    zero = jnp.zeros((), dtype)
    expected = np.asarray(AT_ZERO[name], dtype)
    assert ACTIVATIONS[name].h_prime(zero) == expected
    assert ACTIVATIONS[name].h_prime(-zero) == expected


def test_relu_prime_at_zero_is_jax_nn_convention():
    zero = jnp.zeros((), jnp.float64)
    assert float(jax.grad(jax.nn.relu)(zero)) == 0.0
    assert float(act.relu_prime(zero)) == 0.0
    assert float(jax.grad(act.relu)(zero)) == 0.0


@pytest.mark.parametrize(
    "name",
    [n for n in NAMES],
)
def test_autodiff_of_h_at_zero(name):
    """jax.grad of the library's h is the reference of every gradcheck: it too
    must give the right derivative at the kinks."""
    zero = jnp.zeros((), jnp.float64)
    assert float(jax.grad(ACTIVATIONS[name].h)(zero)) == AT_ZERO[name]


def test_documented_defaults():
    assert LEAKY_SLOPE == 0.01
    assert ELU_ALPHA == 1.0
    a = jnp.array([-2.0, -1.0, 3.0], jnp.float64)
    np.testing.assert_array_equal(act.leaky_relu(a), [-0.02, -0.01, 3.0])
    np.testing.assert_allclose(
        act.elu(a), [np.expm1(-2.0), np.expm1(-1.0), 3.0], rtol=1e-15
    )


def test_registry():
    assert tuple(ACTIVATIONS) == NAMES
    assert act.HIDDEN_ACTIVATIONS == NAMES
    assert act.OUTPUT_ACTIVATIONS == (*NAMES, "softmax")
    for name, pair in ACTIVATIONS.items():
        assert pair.name == name
    assert act.output_fn("softmax") is act.softmax
    assert act.output_fn("tanh") is act.tanh


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_softmax_matches_jax_nn_and_is_stable(dtype):
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((7, 5)) * 3, dtype)
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(act.softmax(a), jax.nn.softmax(a), rtol=10 * rtol)
    np.testing.assert_allclose(act.softmax(a[0]), jax.nn.softmax(a[0]), rtol=10 * rtol)
    # Logits of +-1e4: no overflow, rows still sum to 1, shift invariant.
    big = jnp.asarray([[1e4, -1e4, 0.0], [1e4, 1e4, -1e4], [-1e4, -1e4, -1e4]], dtype)
    s = act.softmax(big)
    assert s.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(s)))
    np.testing.assert_allclose(
        s, [[1, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]], rtol=rtol, atol=atol
    )
    shifted = act.softmax(a + jnp.asarray(100.0, dtype))
    np.testing.assert_allclose(shifted, act.softmax(a), rtol=1e3 * rtol, atol=atol)
