"""How many examples a property test draws.

The default ("fnnet" profile, tests/conftest.py) is small and derandomized:
the same few cases every run, so CI stays fast and reproducible. Before a
release, run ``FNNET_HYPOTHESIS=deep python -m pytest -q -n 2``: the "deep"
profile draws ``DEEP_FACTOR`` times as many examples per test, from a fresh
random seed each run (hypothesis prints the seed and a reproducer on failure).
"""

import os

PROFILES = ("fnnet", "deep")
PROFILE = os.environ.get("FNNET_HYPOTHESIS", "fnnet") or "fnnet"
if PROFILE not in PROFILES:
    raise ValueError(f"FNNET_HYPOTHESIS must be one of {PROFILES}, got {PROFILE!r}")
DEEP_FACTOR = 25


def examples(n: int) -> int:
    """n examples under the default profile, DEEP_FACTOR * n under "deep"."""
    return n * DEEP_FACTOR if PROFILE == "deep" else n
