"""What fnnet raises for bad input, and a checked mode for compiled code.

:class:`InputError` marks an error that describes the caller's input: a bad
value, file or setting, never a fault of the library. Its subclasses
(:class:`fnnet.data.DataError`, :class:`fnnet.checkpoint.CheckpointError`,
:class:`InputTypeError`) are still ``ValueError``/``TypeError``, so code that
catches those keeps working. The command line reports an :class:`InputError`
as a usage error (exit 2) and lets every other exception through with its
traceback, so a bug is never dressed up as a user mistake.

Inside ``jax.jit`` values are not known, so fnnet's value checks cannot raise
there; invalid values give results that are unmistakably invalid instead
(an integer label outside [0, K) gives a NaN loss and NaN gradients, by the
hand-written backward pass and by ``jax.grad`` alike). :func:`checked` turns
those value checks into real errors inside compiled code, through
``jax.experimental.checkify``::

    step = fnnet.checked(jax.jit(lambda p, x, y: net.backprop(p, x, y)))
    step(params, x, y)   # raises InputError for a label outside [0, K)

Plain Python: ``jax`` is imported only by :func:`checked` and
:func:`value_check`, so :mod:`fnnet.data` stays free of it.
"""

from __future__ import annotations

import functools
import threading


class InputError(ValueError):
    """Bad input: a value, file or setting that the caller can fix.

    The message names the argument, flag or file, what was expected and what
    was found.
    """


class InputTypeError(InputError, TypeError):
    """Bad input of the wrong type (also a ``TypeError``)."""


_CONTEXT = threading.Lock()
_checks = None  # the jit-cache-sensitive context of checked(), made on first use


def _checks_context():
    """The ``jax.make_user_context`` flag that turns value checks on.

    It is part of JAX's tracing cache key, so a function compiled without
    checks is traced again (with them) under :func:`checked`.
    """
    global _checks
    with _CONTEXT:
        if _checks is None:
            import jax

            _checks = jax.make_user_context(default_value=False)
    return _checks


def checks_enabled() -> bool:
    """Whether the code being traced runs under :func:`checked`."""
    return _checks is not None and bool(_checks.value)


def value_check(ok, message: str, **values) -> None:
    """Inside :func:`checked`: fail with ``message`` where ``ok`` is False.

    Elsewhere it does nothing (the caller's result already shows the problem,
    e.g. as NaN). ``message`` may hold ``{name}`` fields filled from
    ``values`` (arrays, read on the device); see ``checkify.check``.
    """
    if checks_enabled():
        from jax.experimental import checkify

        checkify.check(ok, message, **values)


def checked(fn):
    """``fn`` with fnnet's value checks compiled in; a failed check raises.

    ``fn`` may be jitted or contain jitted calls (fnnet's own included):
    under this wrapper they are traced again with the checks, such as
    "labels in [0, K)", that otherwise run only on concrete values. The
    checks cost a few reductions per call; the unchecked ``fn`` is
    unchanged.

    Args:
      fn: a function of arrays, e.g. ``jax.jit(net.cost)`` or a training step.

    Returns:
      A function with ``fn``'s signature and results that raises
      :class:`InputError` with the check's message when a check fails.
    """
    from jax.experimental import checkify

    context = _checks_context()
    checkified = checkify.checkify(fn, errors=checkify.user_checks)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with context(True):
            err, out = checkified(*args, **kwargs)
        message = err.get()
        if message is not None:
            raise InputError(message.split(" (`check` failed")[0])
        return out

    return wrapper
