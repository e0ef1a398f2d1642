"""fnnet: multi-layer perceptrons in JAX with a hand-written backward pass.

The backward pass follows the derivation in ``docs/derivation.md`` (column
vectors, W is out x in) and is checked against ``jax.grad`` and finite
differences; see :class:`MLP` and :func:`gradcheck`. Users extend it with
their own :class:`Activation`, :class:`Loss` and :class:`Block`, each
checked by :func:`verify`.

Layout, in the order data flows: ``data`` -> the functional core
(``activations``, ``losses``, ``blocks``, ``backward``, ``core``) -> the
checked front (``network.MLP``) -> ``train``, ``ensemble``, ``gradcheck``,
``verify`` -> ``run`` (a run folder as a model: :func:`load_run`) -> ``cli``
and ``experiments/``.
"""

from fnnet.activations import ACTIVATIONS, ELU_ALPHA, LEAKY_SLOPE, Activation
from fnnet.blocks import Block
from fnnet.errors import InputError, checked
from fnnet.gradcheck import GradcheckReport, gradcheck, relative_error
from fnnet.losses import LOSSES, Loss
from fnnet.network import MLP
from fnnet.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "ELU_ALPHA",
    "LEAKY_SLOPE",
    "LOSSES",
    "MLP",
    "Activation",
    "Block",
    "GradcheckReport",
    "InputError",
    "Loss",
    "VerifyReport",
    "checked",
    "gradcheck",
    "load_run",
    "relative_error",
    "verify",
]


def __getattr__(name: str):
    # load_run pulls in the training stack (optax); import it on first use so
    # that `import fnnet` stays light.
    if name == "load_run":
        from fnnet.run import load_run

        return load_run
    raise AttributeError(f"module 'fnnet' has no attribute {name!r}")
