"""fnnet: multi-layer perceptrons in JAX with a hand-written backward pass.

The backward pass follows the textbook derivation (``DERIVATION.md``, seed 000
notation: W is out x in) and is checked against ``jax.grad`` and finite
differences; see :class:`MLP` and :func:`gradcheck`.
"""

from fnnet.activations import ACTIVATIONS, ELU_ALPHA, LEAKY_SLOPE
from fnnet.gradcheck import GradcheckReport, gradcheck, relative_error
from fnnet.losses import LOSSES
from fnnet.network import MLP

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "ELU_ALPHA",
    "LEAKY_SLOPE",
    "LOSSES",
    "MLP",
    "GradcheckReport",
    "gradcheck",
    "relative_error",
]
