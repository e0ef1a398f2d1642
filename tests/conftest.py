"""Test-session configuration.

The whole test process runs with float64 enabled, so gradient tests can use
float64 parameters; float32 tests ask for float32 explicitly. Rank promotion
raises and dtype promotion is strict, so no (n,) vs (n, 1) broadcast or silent
upcast slips through the library.
"""

import atexit
import os
import shutil
import tempfile

# Compiling dominates this suite's time (many small programs, each compiled
# once), and XLA's backend optimizations are most of each compile: the suite
# turns them off (optimization level 0, no expensive LLVM passes), as
# ``python -m experiments --quick`` does; the programs compute the same
# operations. And the processes of one session (pytest-xdist's
# workers, the CLI runs and other subprocesses that tests start) share what
# they compile through JAX's persistent compilation cache, in a folder of
# this session only, removed at its end. Both are set through the
# environment, which those processes inherit. FNNET_XLA_OPTIMIZE=1 runs the
# suite as a user's process runs: XLA's defaults, no shared cache.
if os.environ.get("FNNET_XLA_OPTIMIZE", "0") != "1":
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the session's first process
        cache = tempfile.mkdtemp(prefix="fnnet-tests-jax-cache-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import pytest
from budget import DEEP_FACTOR, PROFILE, examples
from hypothesis import settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Deterministic and bounded property tests (after jax's hypothesis_test_util):
# no example database, derandomized, no deadline (compile times vary).
settings.register_profile(
    "fnnet", max_examples=examples(20), derandomize=True, database=None, deadline=None
)
# FNNET_HYPOTHESIS=deep, for releases: DEEP_FACTOR times the examples, a new
# random seed every run (see tests/budget.py; tests that set their own
# max_examples scale it with budget.examples).
settings.register_profile(
    "deep",
    max_examples=20 * DEEP_FACTOR,
    derandomize=False,
    database=None,
    deadline=None,
    print_blob=True,
)
settings.load_profile(PROFILE)


@pytest.fixture
def getkey():
    """Fresh PRNG keys on demand, deterministic per test."""
    keys = iter(jax.random.split(jax.random.key(1234), 1000))
    return lambda: next(keys)
