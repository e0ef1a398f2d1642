"""The privacy spent by DP-SGD, from an existing accountant.

fnnet does not compute epsilon itself: it describes its training as a
``dp_accounting`` event (Google's ``dp-accounting`` package, imported only
when an epsilon is asked for, so ``import fnnet`` does not need it) and asks
the package's Renyi-DP accountant for epsilon at the run's delta.

The event: every step of :func:`fnnet.train.dp_train_step` is the Gaussian
mechanism with noise multiplier sigma (noise standard deviation sigma C on a
sum whose per-example sensitivity is C) applied to a Poisson sample of the
training set with rate q = B / N; a run of T steps is that event composed T
times. Neighbouring data sets differ by adding or removing one example.
"""

from __future__ import annotations

import functools

#: The accountant used for every epsilon fnnet reports.
ACCOUNTANT = "rdp"


def poisson_schedule(n: int, batch_size: int) -> tuple[float, int]:
    """(q, steps per epoch): sampling rate B / N and N // B steps, B = min(B, N)."""
    B = min(batch_size, n)
    return B / n, n // B


def dp_event(noise_multiplier: float, sample_rate: float, steps: int):
    """The ``dp_accounting`` event of ``steps`` Poisson-sampled Gaussian steps."""
    import dp_accounting

    step = dp_accounting.PoissonSampledDpEvent(
        sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(step, steps)


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float):
    """epsilon of (epsilon, delta)-DP after ``steps`` DP-SGD steps (RDP accountant).

    Renyi DP composes by addition, so the accountant's RDP curve of one step
    (computed once per (sigma, q) and cached) times ``steps`` is the curve of
    the whole run, the very vector the package's ``RdpAccountant`` composes
    for ``dp_event(...)``; the package converts it to epsilon.

    Args:
      noise_multiplier: sigma, the noise standard deviation over the clip C.
      sample_rate: q, each example's probability of joining a step's batch.
      steps: the number of steps taken.
      delta: the delta of the guarantee.

    Raises:
      ImportError: the ``dp-accounting`` package is not installed, with the
        command that installs it.
    """
    try:
        from dp_accounting import rdp
    except ImportError as err:
        raise ImportError(
            "reporting DP-SGD's epsilon needs the dp-accounting package: "
            "pip install dp-accounting"
        ) from err
    orders, one_step = _one_step_rdp(float(noise_multiplier), float(sample_rate))
    eps, _ = rdp.compute_epsilon(orders, steps * one_step, delta)
    return float(eps)


@functools.lru_cache(maxsize=64)
def _one_step_rdp(noise_multiplier: float, sample_rate: float):
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event(noise_multiplier, sample_rate, 1))
    return accountant.orders, accountant.rdp
