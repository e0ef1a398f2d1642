"""Test-session configuration.

The whole test process runs with float64 enabled, so gradient tests can use
float64 parameters; float32 tests ask for float32 explicitly. Rank promotion
raises and dtype promotion is strict, so no (n,) vs (n, 1) broadcast or silent
upcast slips through the library.
"""

import jax
import pytest
from hypothesis import settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Deterministic and bounded property tests (after jax's hypothesis_test_util):
# no example database, derandomized, no deadline (compile times vary).
settings.register_profile(
    "fnnet", max_examples=20, derandomize=True, database=None, deadline=None
)
settings.load_profile("fnnet")


@pytest.fixture
def getkey():
    """Fresh PRNG keys on demand, deterministic per test."""
    keys = iter(jax.random.split(jax.random.key(1234), 1000))
    return lambda: next(keys)
