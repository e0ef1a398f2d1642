"""The multi-layer perceptron: a checked front over the functional core.

Notation (docs/derivation.md#notation): ``z^(0) = x``; for l = 1..L

    a^(l) = W^(l) z^(l-1) + b^(l)        (eq. 1)
    z^(l) = h^(l)(a^(l))                 (eq. 2)

with ``W^(l)`` of shape (M_l, M_{l-1}) and ``b^(l)`` of shape (M_l,). A batch
is a matrix whose rows are examples: ``A = Z W^T + b`` (eq. 12).

:class:`MLP` is a frozen, hashable dataclass of Python values: it carries no
arrays, so it can be a static argument of ``jax.jit``. Parameters are a
separate pytree. Each public method validates its inputs once, with
:meth:`MLP.validate`, and then calls one compiled function of
:mod:`fnnet.core`.

Input checks come in two kinds:

* shape and dtype checks always run, in Python, before any computation; under
  ``jax.jit`` they run once, at trace time, and cost nothing afterwards;
* checks on values (labels in range, probability rows summing to 1, bce
  targets in [0, 1]) need concrete values, so they run only when the argument
  is not a tracer, i.e. outside ``jit``/``vmap``/``grad``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fnnet import activations, blocks, core, losses
from fnnet import precision as mp
from fnnet.activations import Activation, name_of
from fnnet.backward import check_outer_product_blocks as backward_check_blocks
from fnnet.blocks import Block
from fnnet.core import dropout_masks, forward_cache  # noqa: F401  (public here too)
from fnnet.losses import Loss
from fnnet.types import Array, Params

_MISSING = object()

#: How to turn on JAX's 64-bit mode, for messages about float64.
X64_HINT = (
    'turn on 64-bit mode first: jax.config.update("jax_enable_x64", True) at the '
    "start of the program, or JAX_ENABLE_X64=1 in the environment"
)


def float_dtype(dtype, argument: str = "dtype") -> np.dtype:
    """``dtype`` as a NumPy dtype, checked: floating, and available in JAX now.

    With 64-bit mode off JAX silently computes float64 requests in float32;
    asking for float64 then is an error here instead.

    Args:
      dtype: anything ``jnp.dtype`` accepts.
      argument: the argument's name, for messages.

    Raises:
      TypeError: ``dtype`` is not floating.
      ValueError: ``dtype`` is 64-bit and JAX's 64-bit mode is off; the
        message says how to turn it on.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{argument} must be a floating dtype, got {dtype}")
    available = jax.dtypes.canonicalize_dtype(dtype)
    if available != dtype:
        raise ValueError(
            f"{argument}={dtype} needs JAX's 64-bit mode, which is off (JAX would "
            f"silently compute in {available}); {X64_HINT}"
        )
    return dtype


@dataclasses.dataclass(frozen=True)
class MLP:
    """A fully connected feed-forward network and its cost.

    Args:
      sizes: layer widths ``(M_0, M_1, ..., M_L)``: M_0 inputs, M_L outputs,
        at least two entries.
      activation: hidden activation h^(1..L-1): one for every hidden layer or
        one per hidden layer. Each is a name of ``HIDDEN_ACTIVATIONS``, an
        :class:`fnnet.Activation`, or an :class:`fnnet.Block` (which maps
        a^(l) to z^(l) of the same width; its parameters live in the layer's
        dict under the block's name).
      output: output activation h^(L): a hidden activation name, ``"softmax"``
        or an :class:`fnnet.Activation`.
      loss: the per-example loss L_i: ``"mse"``, ``"bce"`` (needs a sigmoid
        output), ``"cross_entropy"`` (needs a softmax output), or an
        :class:`fnnet.Loss` (any output).
      keep_prob: inverted-dropout keep probability p of the hidden layers'
        outputs (1.0: no dropout). Dropout is applied only when a ``key`` is
        passed to ``forward``/``cost``/``backprop``; without one the network
        is in evaluation mode.
      precision: the precision of every matrix product of the forward and
        backward passes (and so of ``jax.grad`` of :meth:`cost`): None (the
        platform default, which follows ``jax_default_matmul_precision``),
        ``"default"`` (fastest: TF32 for float32 on NVIDIA GPUs),
        ``"high"``, ``"highest"`` (full float32), or a
        ``jax.lax.Precision``, stored by its name. It matters for float32
        on GPUs and TPUs; CPUs compute float32 products in float32 whatever
        the choice. See :mod:`fnnet.precision`.

    Example::

        net = MLP(sizes=(64, 128, 10), activation="relu", output="softmax",
                  loss="cross_entropy")
        params = net.init(jax.random.key(0))
        J, grads = net.backprop(params, x, y)
    """

    sizes: tuple[int, ...]
    activation: str | Activation | Block | tuple = "relu"
    output: str | Activation = "identity"
    loss: str | Loss = "mse"
    keep_prob: float = 1.0
    precision: str | jax.lax.Precision | None = None

    def __post_init__(self):
        sizes = self.sizes
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
            raise TypeError(f"sizes must be a tuple of ints, got {sizes!r}")
        if len(sizes) < 2:
            raise ValueError(
                f"sizes must list at least the input and output widths, got {sizes!r}"
            )
        for m in sizes:
            if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
                raise ValueError(f"sizes must be positive ints, got {sizes!r}")
        object.__setattr__(self, "sizes", tuple(int(m) for m in sizes))

        act = self.activation
        if isinstance(act, (str, Activation, Block)):
            specs = (act,)
        elif isinstance(act, Sequence):
            specs = tuple(act)
            object.__setattr__(self, "activation", specs)
            n_hidden = len(self.sizes) - 2
            if len(specs) != n_hidden:
                raise ValueError(
                    f"activation has {len(specs)} names but sizes={self.sizes} has "
                    f"{n_hidden} hidden layers; give one name (or Activation, or "
                    "Block) per hidden layer or a single one for all"
                )
        else:
            raise TypeError(
                "activation must be a name, an fnnet.Activation, an fnnet.Block or "
                f"a tuple of them, got {act!r}"
            )
        for spec in specs:
            if not isinstance(spec, Block):
                activations.get(spec)
        output = activations.get(self.output, output=True)
        if isinstance(output, Activation) and output.name in activations.ACTIVATIONS:
            if activations.ACTIVATIONS[output.name] is output:  # a built-in: its name
                object.__setattr__(self, "output", output.name)
        loss = losses.get(self.loss)
        needed = losses.REQUIRED_OUTPUT.get(loss) if isinstance(loss, str) else None
        if needed is not None and self.output != needed:
            raise ValueError(
                f"loss={loss!r} needs output={needed!r}, got output="
                f"{name_of(self.output)!r} (mse and fnnet.Loss work with any output)"
            )
        if loss == "cross_entropy" and self.sizes[-1] < 2:
            raise ValueError(
                "loss='cross_entropy' needs at least 2 output units, got "
                f"sizes[-1]={self.sizes[-1]}; use output='sigmoid', loss='bce' "
                "for one"
            )
        if self.output == "softmax" and self.sizes[-1] < 2:
            raise ValueError(
                "output='softmax' over 1 output unit is always 1 and cannot learn; "
                f"got sizes[-1]={self.sizes[-1]}: use output='sigmoid' (with "
                "loss='bce' for two classes) or output='identity' for regression"
            )
        p = self.keep_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"keep_prob must be a float in (0, 1], got {p!r}")
        object.__setattr__(self, "keep_prob", float(p))
        object.__setattr__(self, "precision", mp.check(self.precision))

    # ----------------------------------------------------------------- structure

    @property
    def num_layers(self) -> int:
        """L, the number of layers with parameters."""
        return len(self.sizes) - 1

    @property
    def hidden_blocks(self) -> tuple[Activation | Block, ...]:
        """The blocks of h^(1..L-1): Activations or user Blocks."""
        act = self.activation
        specs = act if isinstance(act, tuple) else (act,) * (self.num_layers - 1)
        return tuple(s if isinstance(s, Block) else activations.get(s) for s in specs)

    @property
    def hidden_activations(self) -> tuple[str, ...]:
        """Names of h^(1..L-1)."""
        return tuple(b.name for b in self.hidden_blocks)

    def extensions(self) -> tuple:
        """The user's Activations, Blocks and Loss in this network (no built-ins)."""
        found = [
            b
            for b in self.hidden_blocks
            if b.name not in activations.ACTIVATIONS
            or activations.ACTIVATIONS[b.name] is not b
        ]
        found += [e for e in (self.output, self.loss) if not isinstance(e, str)]
        return tuple(dict.fromkeys(found))

    def describe(self) -> dict:
        """The configuration as JSON-able values (extensions by their names).

        ``"precision"`` appears only when it was set (not None), so the
        description of a network with the platform default is unchanged.
        """
        act = self.activation
        described = {
            "sizes": list(self.sizes),
            "activation": [name_of(a) for a in act]
            if isinstance(act, tuple)
            else name_of(act),
            "output": name_of(self.output),
            "loss": name_of(self.loss),
            "keep_prob": self.keep_prob,
        }
        if self.precision is not None:
            described["precision"] = self.precision
        return described

    # ---------------------------------------------------------------- public API

    def init(self, key: Array, dtype=jnp.float32) -> Params:
        """Random initial parameters, a tuple of {"W": (M_l, M_{l-1}), "b": (M_l,)}.

        W^(l) is drawn by the scheme of the activation (or block) h^(l) that
        follows it, its ``weight_init``: ``"he"`` N(0, 2 / M_{l-1}) for relu,
        leaky_relu, elu and gelu; ``"lecun"`` N(0, 1 / M_{l-1}) for identity,
        sigmoid, tanh, softplus and softmax, and for a user's Activation or
        Block that names no scheme; ``"glorot"`` N(0, 2 / (M_{l-1} + M_l))
        when one asks for it. Biases start at 0. A hidden
        :class:`fnnet.Block` with parameters gets
        ``block.init(fold_in(key_l, 1), M_l, dtype)`` under its name.

        Args:
          key: a JAX PRNG key, split once per layer.
          dtype: floating dtype of every leaf; all computation runs in it.
            float64 needs JAX's 64-bit mode (``jax.config.update(
            "jax_enable_x64", True)`` or ``JAX_ENABLE_X64=1``).

        Raises:
          TypeError: ``dtype`` is not floating.
          ValueError: ``dtype`` is float64 and 64-bit mode is off (JAX would
            silently give float32).
        """
        dtype = float_dtype(dtype)
        check_key(key)
        keys = jax.random.split(key, self.num_layers)
        hidden = self.hidden_blocks
        params = []
        for l, (k, fan_in, fan_out) in enumerate(
            zip(keys, self.sizes[:-1], self.sizes[1:], strict=True)
        ):
            # The scheme of what follows the layer; softmax (a name) has none.
            after = (
                hidden[l]
                if l < len(hidden)
                else activations.get(self.output, output=True)
            )
            scheme = getattr(after, "weight_init", activations.DEFAULT_WEIGHT_INIT)
            gain2 = activations.weight_gain2(scheme, fan_in, fan_out)
            layer = blocks.affine_init(k, fan_in, fan_out, dtype, gain2)
            if l < len(hidden) and hidden[l].init:
                block_key = jax.random.fold_in(k, 1)
                layer[hidden[l].name] = hidden[l].init(block_key, fan_out, dtype)
            params.append(layer)
        return tuple(params)

    def forward(self, params: Params, x: Array, *, key: Array | None = None) -> Array:
        """yhat = z^(L): (M_0,) -> (M_L,) for one example, (N, M_0) -> (N, M_L).

        Args:
          params: as returned by :meth:`init`.
          x: one example (M_0,) or a batch (N, M_0), floating.
          key: PRNG key for dropout (training mode); None for evaluation.
        """
        x, _ = self.validate(params, x, key=key)
        return _forward(self, params, x, key)

    def cost(self, params: Params, x: Array, y: Array, *, key: Array | None = None):
        """J: the mean of the per-example loss L_i over the batch (eq. 3).

        Differentiable with ``jax.grad`` (that is the automatic reference the
        hand-written :meth:`backprop` is checked against).

        Args:
          params: as returned by :meth:`init`.
          x: (M_0,) or (N, M_0).
          y: targets; see :meth:`backprop`.
          key: PRNG key for dropout (training mode); None for evaluation.
        """
        x, y = self.validate(params, x, y, key=key)
        return _cost(self, params, x, y, key)

    def backprop(
        self,
        params: Params,
        x: Array,
        y: Array,
        *,
        key: Array | None = None,
        input_grad: bool = False,
    ):
        """J and dJ/dparams from the hand-written backward pass (eqs. 5-14).

        One example (x of shape (M_0,)) runs the per-example recursion with
        outer products; a batch (x of shape (N, M_0)) the matrix form. Both
        give the gradient of the mean loss, so ``jax.vmap(net.backprop,
        in_axes=(None, 0, 0))`` yields per-example gradients whose mean is the
        batch gradient.

        Args:
          params: as returned by :meth:`init`.
          x: (M_0,) or (N, M_0), floating; converted to the parameters' dtype.
          y: targets. ``mse``/``bce``/a Loss: floating, the output's shape
            ((N, M_L) or (M_L,)); with one output unit (N,) or () is accepted
            too. ``bce`` targets lie in [0, 1]. ``cross_entropy``: integer
            labels in [0, M_L) of shape (N,) or (), or probability rows of
            shape (N, M_L) or (M_L,) that sum to 1.
          key: PRNG key for dropout; the backward pass reuses the forward's mask.
          input_grad: also return dJ/dx, shaped like x.

        Returns:
          ``(J, grads)``, or ``(J, grads, dx)`` with ``input_grad=True``;
          ``grads`` has the structure of ``params``.
        """
        x, y = self.validate(params, x, y, key=key)
        J, grads, dx = _backprop(self, params, x, y, key, input_grad)
        return (J, grads, dx) if input_grad else (J, grads)

    def per_example_grads(
        self, params: Params, x: Array, y: Array, *, key: Array | None = None
    ):
        """Per-example losses L_i (N,) and gradients (leading axis N on every leaf).

        ``jax.vmap`` of the single-example hand-written backward pass.

        Args:
          params: as returned by :meth:`init`.
          x: a batch (N, M_0), floating.
          y: its targets; see :meth:`backprop`.
          key: PRNG key for dropout, as for :meth:`backprop`. The masks are
            those the batched pass draws for this key and batch: one (N, M_l)
            mask per hidden layer, and example i uses row i of each. So the
            mean of the per-example gradients equals
            ``backprop(params, x, y, key=key)``'s gradient, and example i's
            gradient is that of its own loss under its row of the masks
            (not of ``backprop(params, x[i], y[i], key=key)``, which would
            draw a mask of its own).

        Returns:
          ``(L, grads)``: L (N,), and grads with the structure of ``params``
          and a leading axis N on every leaf.
        """
        x, y = self.validate(params, x, y, key=key, batch=True)
        return _per_example(self, params, x, y, key)

    def per_example_norms(
        self, params: Params, x: Array, y: Array, *, key: Array | None = None
    ):
        """J, batch gradients and per-example gradient norms, in one pass (eq. 25).

        The per-example gradient g_i is the gradient of example i's own loss
        L_i (the batch gradient is their mean). Its norm per layer (over W
        and b) and in total comes from the batched backward's rows; no g_i
        is formed. Hidden blocks with parameters are refused (ValueError).

        Args:
          params: as returned by :meth:`init`.
          x: a batch (N, M_0); y: its targets (see :meth:`backprop`).
          key: PRNG key for dropout; example i uses its own mask rows.

        Returns:
          :class:`fnnet.core.GradNorms` ``(J, grads, layer_norms (N, L),
          norms (N,))``.
        """
        x, y = self.validate(params, x, y, key=key, batch=True)
        backward_check_blocks(self.hidden_blocks)
        return _per_example_norms(self, params, x, y, key)

    def clipped_grads(
        self,
        params: Params,
        x: Array,
        y: Array,
        *,
        clip: float,
        key: Array | None = None,
        mean: bool = False,
    ):
        """sum_i c_i g_i, each g_i clipped to norm ``clip``, in one pass (eq. 27).

        c_i = min(1, clip / ||g_i||); the sum takes one product per layer on
        scaled rows (eq. 26). ``mean=True`` divides by N.

        Returns:
          :class:`fnnet.core.ClippedGrads` ``(J, losses, grads, norms,
          factors)``.
        """
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0:
            raise ValueError(f"clip must be a number > 0 (inf: none), got {clip!r}")
        x, y = self.validate(params, x, y, key=key, batch=True)
        backward_check_blocks(self.hidden_blocks)
        return _clipped_grads(self, params, x, y, key, float(clip), bool(mean))

    def hand_cost(
        self, params: Params, x: Array, y: Array, *, key: Array | None = None
    ):
        """J, with the hand-written backward registered as its derivative.

        The value equals :meth:`cost`; ``jax.grad`` (and so optax, or any JAX
        code) differentiates it by running the hand-written backward pass
        instead of tracing the forward pass (``jax.custom_vjp``). Gradients
        flow to ``params``, ``x`` and float ``y``.
        """
        x, y = self.validate(params, x, y, key=key)
        return _hand_cost(self, params, x, y, key)

    def hand_forward(self, params: Params, x: Array) -> Array:
        """yhat, as :meth:`forward`, with the hand-written backward as its VJP.

        Use it to put the network inside any loss written in JAX: ``jax.grad``
        hands the cotangent dL/dyhat to the general output rule (eqs. 5, 6)
        and then to the delta recursion.
        """
        x, _ = self.validate(params, x)
        return _hand_forward(self, params, x)

    # -------------------------------------------------------------- input checks

    def validate(
        self,
        params: Params,
        x: Array,
        y: Array = _MISSING,
        *,
        key: Array | None = None,
        batch: bool = False,
    ):
        """Check params, x, y and key for this network; return ``(x, y)``.

        The one validation of fnnet's checked entry points: the methods above,
        :func:`fnnet.train.fit`, :mod:`fnnet.ensemble` and
        :func:`fnnet.gradcheck` call it once, then the unchecked core.

        Args:
          params: one layer dict per layer, shaped for ``sizes``.
          x: (M_0,) or (N, M_0), floating (array-likes are converted).
          y: targets (see :meth:`backprop`); omit when there are none.
          key: dropout key, which needs ``keep_prob < 1``.
          batch: require x to be a batch (N, M_0).

        Returns:
          ``(x, y)`` as arrays; y is None when it was omitted.

        Raises:
          TypeError, ValueError: naming the argument, the expected and the
            received value.
        """
        self._check_params(params)
        x = self._check_x(x)
        if batch and x.ndim != 2:
            raise ValueError(
                f"x must be a batch (N, {self.sizes[0]}), got {tuple(x.shape)}"
            )
        y = None if y is _MISSING else self._check_y(y, x)
        if key is not None and self.keep_prob == 1.0:
            raise ValueError(
                "key was given but keep_prob=1.0 means no dropout; pass "
                "keep_prob < 1 to MLP or drop the key"
            )
        if key is not None:
            check_key(key)
        return x, y

    def _check_params(self, params: Params) -> None:
        L = self.num_layers
        if isinstance(params, Mapping) or not isinstance(params, Sequence):
            raise TypeError(
                f"params must be a tuple or list of {L} layers "
                f"{{'W': (out, in), 'b': (out,)}}, got {type(params).__name__}"
            )
        if len(params) != L:
            raise ValueError(
                f"params has {len(params)} layers but sizes={self.sizes} needs {L}"
            )
        hidden = self.hidden_blocks
        dtype = None
        for l, layer in enumerate(params):
            block = hidden[l] if l < len(hidden) and hidden[l].init else None
            keys = {"W", "b"} | ({block.name} if block else set())
            if not isinstance(layer, Mapping) or set(layer) != keys:
                got = sorted(layer) if isinstance(layer, Mapping) else type(layer)
                extra = f", {block.name!r}" if block else ""
                raise ValueError(
                    f"params[{l}] must be a dict with keys 'W'{extra} and 'b', "
                    f"got {got}"
                )
            expected = {
                "W": (self.sizes[l + 1], self.sizes[l]),
                "b": (self.sizes[l + 1],),
            }
            leaves = [
                (f"[{name!r}]", layer[name], shape) for name, shape in expected.items()
            ]
            if block:
                leaves += _block_leaves(block, self.sizes[l + 1], layer[block.name])
            for where, leaf, shape in leaves:
                if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                    raise TypeError(
                        f"params[{l}]{where} must be an array of shape {shape}, got "
                        f"a {type(leaf).__name__}; convert nested lists with "
                        "jnp.asarray(..., jnp.float32)"
                    )
                leaf_shape = tuple(getattr(leaf, "shape", ()))
                if leaf_shape != shape:
                    raise ValueError(
                        f"params[{l}]{where} must have shape {shape} for "
                        f"sizes={self.sizes}, got {leaf_shape}"
                    )
                leaf_dtype = jnp.dtype(getattr(leaf, "dtype", type(leaf)))
                if not jnp.issubdtype(leaf_dtype, jnp.floating):
                    raise TypeError(
                        f"params[{l}]{where} must be floating, got {leaf_dtype}"
                    )
                if dtype is None:
                    dtype = leaf_dtype
                    float_dtype(dtype, f"params[{l}]{where}.dtype")
                elif leaf_dtype != dtype:
                    raise TypeError(
                        f"every parameter must share one dtype: params[0]['W'] is "
                        f"{dtype} but params[{l}]{where} is {leaf_dtype}"
                    )

    def _check_x(self, x: Array) -> Array:
        if not hasattr(x, "shape"):
            x = np.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"x must be floating point, got dtype {x.dtype}; convert it with "
                "x.astype(np.float32)"
            )
        M0 = self.sizes[0]
        if x.ndim not in (1, 2) or x.shape[-1] != M0:
            raise ValueError(
                f"x must have shape ({M0},) or (N, {M0}) for sizes={self.sizes}, "
                f"got {tuple(x.shape)}"
            )
        if x.ndim == 2 and x.shape[0] == 0:
            raise ValueError(
                f"x is an empty batch, shape {tuple(x.shape)}; a batch needs at "
                "least one example"
            )
        return x

    def _check_y(self, y: Array, x: Array) -> Array:
        if not hasattr(y, "shape"):
            y = np.asarray(y)
        K = self.sizes[-1]
        batch = tuple(x.shape[:-1])
        out_shape = (*batch, K)
        integer = jnp.issubdtype(y.dtype, jnp.integer)
        floating = jnp.issubdtype(y.dtype, jnp.floating)
        if self.loss == "cross_entropy":
            if integer:
                if tuple(y.shape) != batch:
                    raise ValueError(
                        f"y as integer labels must have shape {batch} for x of shape "
                        f"{tuple(x.shape)}, got {tuple(y.shape)}"
                    )
            elif floating:
                if tuple(y.shape) != out_shape:
                    raise ValueError(
                        f"y as probability rows must have shape {out_shape} for x of "
                        f"shape {tuple(x.shape)}, got {tuple(y.shape)}"
                    )
            else:
                raise TypeError(
                    "y for cross_entropy must be integer labels or floating "
                    f"probabilities, got dtype {y.dtype}"
                )
        else:
            loss = name_of(self.loss)
            if not floating:
                raise TypeError(
                    f"y for loss={loss!r} must be floating point, got dtype "
                    f"{y.dtype}; convert it with y.astype(np.float32)"
                )
            ok = tuple(y.shape) == out_shape or (K == 1 and tuple(y.shape) == batch)
            if not ok:
                extra = f" or {batch}" if K == 1 else ""
                raise ValueError(
                    f"y must have shape {out_shape}{extra} (the output's shape) for "
                    f"loss={loss!r}, got {tuple(y.shape)}"
                )
        if not isinstance(y, jax.core.Tracer):
            self._check_y_values(np.asarray(y))
        return y

    def _check_y_values(self, y: np.ndarray) -> None:
        K = self.sizes[-1]
        if self.loss == "cross_entropy" and np.issubdtype(y.dtype, np.integer):
            bad = (y < 0) | (y >= K)
            if bad.any():
                raise ValueError(
                    f"y holds labels outside [0, {K}) for {K} output units: "
                    f"{np.unique(y[bad])[:10].tolist()}"
                )
            return
        if not np.all(np.isfinite(y)):
            raise ValueError("y holds NaN or infinite values")
        if self.loss == "bce" and ((y < 0) | (y > 1)).any():
            raise ValueError(
                f"y for loss='bce' must lie in [0, 1], got values in "
                f"[{y.min()}, {y.max()}]"
            )
        if self.loss == "cross_entropy":
            sums = y.sum(axis=-1)
            tol = 1e-3 if y.dtype.itemsize <= 2 else 1e-5
            if (y < 0).any() or not np.allclose(sums, 1.0, rtol=0, atol=tol):
                worst = float(np.max(np.abs(sums - 1.0)))
                raise ValueError(
                    "y as probability rows must be non-negative and sum to 1 "
                    f"(within {tol}); the worst row sums to 1 {worst:+.3g}"
                )


def check_key(key, name: str = "key") -> None:
    """Raise a TypeError unless ``key`` is a JAX PRNG key.

    Accepts a typed key (``jax.random.key(0)``) or legacy raw key data
    (``jax.random.PRNGKey(0)``, a uint32 array).
    """
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return
    if isinstance(key, (jax.Array, np.ndarray)) and dtype == jnp.uint32:
        if key.ndim >= 1:
            return
    raise TypeError(
        f"{name} must be a JAX PRNG key such as jax.random.key(0), got "
        f"{type(key).__name__} {key!r}"
    )


def _block_leaves(block: Block, width: int, params):
    """(where, leaf, expected shape) of a hidden block's parameters."""
    expected = _block_shapes(block, width)
    got = jax.tree_util.tree_structure(params)
    if got != jax.tree_util.tree_structure(expected):
        raise ValueError(
            f"params of block {block.name!r} must have the structure of its init, "
            f"{jax.tree_util.tree_structure(expected)}, got {got}"
        )
    return [
        (f"[{block.name!r}]{jax.tree_util.keystr(path)}", leaf, want.shape)
        for (path, leaf), want in zip(
            jax.tree_util.tree_leaves_with_path(params),
            jax.tree_util.tree_leaves(expected),
            strict=True,
        )
    ]


@functools.lru_cache(maxsize=256)
def _block_shapes(block: Block, width: int):
    def init(key):
        return block.init(key, width, jnp.float32)

    return jax.eval_shape(init, jax.random.key(0))


# ---------------------------------------------------------------------------
# The compiled core calls. ``net`` is static: each is traced once per (net,
# shapes, dtypes) and then reused.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _forward(net: MLP, params: Params, x: Array, key) -> Array:
    x, _ = core.prepare(net, params, x)
    return core.forward(net, params, x, core.masks_for(net, key, x))


@functools.partial(jax.jit, static_argnums=0)
def _cost(net: MLP, params: Params, x: Array, y: Array, key) -> Array:
    x, y = core.prepare(net, params, x, y)
    return core.cost(net, params, x, y, core.masks_for(net, key, x))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _backprop(net: MLP, params: Params, x: Array, y: Array, key, input_grad: bool):
    x, y = core.prepare(net, params, x, y)
    J, grads, dx, _ = core.backprop(
        net, params, x, y, core.masks_for(net, key, x), input_grad
    )
    return J, grads, dx


@functools.partial(jax.jit, static_argnums=0)
def _per_example(net: MLP, params: Params, x: Array, y: Array, key):
    x, y = core.prepare(net, params, x, y)
    return core.per_example_grads(net, params, x, y, core.masks_for(net, key, x))


@functools.partial(jax.jit, static_argnums=0)
def _hand_cost(net: MLP, params: Params, x: Array, y: Array, key) -> Array:
    x, y = core.prepare(net, params, x, y)
    return core.hand_cost(net, params, x, y, core.masks_for(net, key, x))


@functools.partial(jax.jit, static_argnums=0)
def _hand_forward(net: MLP, params: Params, x: Array) -> Array:
    x, _ = core.prepare(net, params, x)
    return core.hand_forward(net, params, x)


@functools.partial(jax.jit, static_argnums=0)
def _per_example_norms(net: MLP, params: Params, x: Array, y: Array, key):
    x, y = core.prepare(net, params, x, y)
    return core.per_example_norms(net, params, x, y, core.masks_for(net, key, x))


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _clipped_grads(net: MLP, params, x, y, key, clip: float, mean: bool):
    x, y = core.prepare(net, params, x, y)
    masks = core.masks_for(net, key, x)
    scale = 1.0 / x.shape[0] if mean else None
    return core.clipped_grads(net, params, x, y, clip, masks, scale=scale)
