"""Verify a user's extension: hand derivative vs jax.grad and finite differences.

``verify(extension)`` takes an :class:`fnnet.Activation`, an :class:`fnnet.Loss`
or an :class:`fnnet.Block` (or an :class:`fnnet.MLP`, to verify every
extension in it) and compares the hand-written derivative with

* ``jax.grad`` / ``jax.vjp`` of the extension's forward function, and
* central finite differences (docs/derivation.md eq. 24),

over a grid of inputs that reaches large magnitudes (|a| up to 500 for
activations; inputs scaled by 0.1, 1 and 30 for losses and blocks). It runs
in float64 (``jax.enable_x64`` inside) and returns a :class:`VerifyReport`
with the worst relative error of each comparison, the input where it
occurred, and a pass or fail.

Error measures. Activations are compared point by point,
``|u - v| / max(|u|, |v|, floor)``, with a floor of 1e-9 (against jax.grad)
and 1e-6 (against finite differences) times the largest |h'| on the grid, so
that values far below the derivative's scale (the tails) do not turn rounding
into failures. Losses and blocks are compared per input with the relative
error of docs/derivation.md eq. 23. The tolerances (``AUTO_TOL``, ``FD_TOL``)
are loose enough for correct formulas written differently from JAX's and
tight enough that a missing term fails by orders of magnitude.

Kinks: a = 0 is not on the activation grid; what h' is there is a convention
(relu'(0) = 0 in fnnet), not something a derivative check can decide.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fnnet.activations import Activation
from fnnet.blocks import Block
from fnnet.gradcheck import relative_error
from fnnet.losses import Loss

#: Worst relative error allowed against jax.grad / jax.vjp.
AUTO_TOL = 1e-6
#: Worst relative error allowed against central finite differences.
FD_TOL = 1e-4
#: Magnitudes of the activation grid: +-logspace(-3, log10(500)).
GRID = np.geomspace(1e-3, 500.0, 48)
#: Input scales for losses and blocks.
SCALES = (0.1, 1.0, 30.0)


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify` for one extension."""

    kind: str  # "activation", "loss" or "block"
    name: str
    vs_auto: float  # worst relative error, hand vs jax.grad / jax.vjp
    vs_fd: float  # worst relative error, hand vs finite differences
    worst_auto_at: str  # the input of the worst disagreement with jax.grad
    worst_fd_at: str  # ... and with finite differences
    points: int  # how many inputs were compared

    @property
    def passed(self) -> bool:
        return bool(self.vs_auto <= AUTO_TOL and self.vs_fd <= FD_TOL)

    @property
    def message(self) -> str:
        head = f"{self.kind} {self.name!r}: {'PASS' if self.passed else 'FAIL'}"
        lines = [
            f"{head} over {self.points} inputs; worst relative error "
            f"hand vs jax.grad {self.vs_auto:.2e} (tol {AUTO_TOL:g}), "
            f"hand vs finite differences {self.vs_fd:.2e} (tol {FD_TOL:g})"
        ]
        if not self.vs_auto <= AUTO_TOL:
            lines.append(f"  hand and jax.grad disagree at {self.worst_auto_at}")
        if not self.vs_fd <= FD_TOL:
            lines.append(
                f"  hand and finite differences disagree at {self.worst_fd_at}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.message

    def raise_if_failed(self) -> VerifyReport:
        """Raise ``ValueError`` with :attr:`message` unless the check passed."""
        if not self.passed:
            raise ValueError(self.message)
        return self


def verify(extension, *, key: jax.Array | None = None, width: int = 5):
    """Check an extension's hand-written derivative; see the module docstring.

    Args:
      extension: an :class:`fnnet.Activation`, :class:`fnnet.Loss`,
        :class:`fnnet.Block`, or an :class:`fnnet.MLP` (every user extension
        in it is verified; built-ins are skipped).
      key: PRNG key of the random inputs and directions (default key 0).
      width: feature width of the random inputs of losses and blocks.

    Returns:
      A :class:`VerifyReport`, or a tuple of them for an MLP.
    """
    key = jax.random.key(0) if key is None else key
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    with jax.enable_x64(True):
        if isinstance(extension, Activation):
            return _verify_activation(extension)
        if isinstance(extension, Loss):
            return _verify_loss(extension, key, width)
        if isinstance(extension, Block):
            return _verify_block(extension, key, width)
        extensions = getattr(extension, "extensions", None)
        if callable(extensions):
            return tuple(verify(e, key=key, width=width) for e in extensions())
    raise TypeError(
        "verify takes an fnnet.Activation, fnnet.Loss, fnnet.Block or fnnet.MLP, "
        f"got {type(extension).__name__}"
    )


def _pointwise(u, v, floor):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    scale = np.maximum(np.maximum(np.abs(u), np.abs(v)), floor)
    err = np.abs(u - v) / scale
    return np.where(np.isnan(err) | np.isinf(u) ^ np.isinf(v), np.inf, err)


def _verify_activation(act: Activation) -> VerifyReport:
    a = jnp.asarray(np.concatenate([-GRID[::-1], GRID]), jnp.float64)
    hand = jnp.asarray(act.h_prime(a), jnp.float64)
    auto = jax.vmap(jax.grad(lambda t: act.h(t)))(a)
    step = 1e-6 * jnp.maximum(1.0, jnp.abs(a))
    fd = (act.h(a + step) - act.h(a - step)) / ((a + step) - (a - step))
    scale = max(1.0, float(np.nanmax(np.abs(np.asarray(auto)))))
    err_auto = _pointwise(hand, auto, 1e-9 * scale)
    err_fd = _pointwise(hand, fd, 1e-6 * scale)

    def where(err, ref, ref_name):
        i = int(np.argmax(err))
        return (
            f"a = {float(a[i]):.6g}: h_prime {float(hand[i]):.6g}, "
            f"{ref_name} {float(ref[i]):.6g}"
        )

    return VerifyReport(
        "activation",
        act.name,
        float(np.max(err_auto)),
        float(np.max(err_fd)),
        where(err_auto, auto, "jax.grad(h)"),
        where(err_fd, fd, "finite difference"),
        int(a.size),
    )


def _directional_fd(f, point, directions, eps=1e-6):
    """Central differences of scalar f at ``point`` along each direction."""
    out = []
    for v in directions:
        plus = jax.tree.map(lambda p, d: p + eps * d, point, v)
        minus = jax.tree.map(lambda p, d: p - eps * d, point, v)
        out.append((f(plus) - f(minus)) / (2 * eps))
    return np.asarray(out)


def _dot(tree_a, tree_b):
    return sum(
        jnp.vdot(a, b)
        for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True)
    )


def _random_like(key, tree, n):
    """n random unit-norm directions shaped like ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for k in jax.random.split(key, n):
        ks = jax.random.split(k, len(leaves))
        vs = [
            jax.random.normal(q, t.shape, t.dtype)
            for q, t in zip(ks, leaves, strict=True)
        ]
        norm = jnp.sqrt(sum(jnp.sum(v * v) for v in vs))
        out.append(jax.tree.unflatten(treedef, [v / norm for v in vs]))
    return out


def _tracker():
    worst = {"auto": (0.0, ""), "fd": (0.0, "")}

    def note(kind, err, where):
        err = float(err) if np.isfinite(err) else np.inf
        if err >= worst[kind][0] and (err > 0 or not worst[kind][1]):
            worst[kind] = (err, where)

    return worst, note


def _verify_loss(loss: Loss, key, width: int) -> VerifyReport:
    def total(yhat, y):
        return jnp.sum(loss.value(yhat, y))

    worst, note = _tracker()
    points = 0
    for i, scale in enumerate(SCALES):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        yhat = scale * jax.random.normal(k1, (4, width), jnp.float64)
        y = scale * jax.random.normal(k2, (4, width), jnp.float64)
        hand = jnp.asarray(loss.grad(yhat, y), jnp.float64)
        auto = jax.grad(total)(yhat, y)
        dirs = _random_like(k3, yhat, 4)
        fd = _directional_fd(lambda yh, y=y: total(yh, y), yhat, dirs)
        proj = np.asarray([_dot(hand, d) for d in dirs])
        where = f"yhat, y ~ {scale:g} * N(0, 1), shape {yhat.shape}"
        i = tuple(
            int(j)
            for j in np.unravel_index(int(np.argmax(np.abs(hand - auto))), yhat.shape)
        )
        at = (
            f"yhat{list(i)} = {float(yhat[i]):.6g}, y{list(i)} = {float(y[i]):.6g}: "
            f"grad {float(hand[i]):.6g}, jax.grad {float(auto[i]):.6g} ({where})"
        )
        note("auto", relative_error(hand, auto), at)
        note("fd", relative_error(proj, fd), f"grad(yhat, y) with {where}")
        if loss.target_grad is not None:
            hand_y = jnp.asarray(loss.target_grad(yhat, y), jnp.float64)
            auto_y = jax.grad(total, argnums=1)(yhat, y)
            fd_y = _directional_fd(lambda t, yhat=yhat: total(yhat, t), y, dirs)
            proj_y = np.asarray([_dot(hand_y, d) for d in dirs])
            note("auto", relative_error(hand_y, auto_y), f"target_grad with {where}")
            note("fd", relative_error(proj_y, fd_y), f"target_grad with {where}")
        points += yhat.shape[0]
    return _report("loss", loss.name, worst, points)


def _verify_block(block: Block, key, width: int) -> VerifyReport:
    worst, note = _tracker()
    k_init, key = jax.random.split(key)
    params = None
    if block.init is not None:
        params = block.init(k_init, width, jnp.float64)
    points = 0
    for i, (scale, shape) in enumerate(
        [(s, (3, width)) for s in SCALES] + [(1.0, (width,))]
    ):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        x = scale * jax.random.normal(k1, shape, jnp.float64)
        y, cache = block.forward(params, x)
        dy = jax.random.normal(k2, y.shape, jnp.float64)
        d_params, dx = block.backward(params, cache, dy)
        primal = (params, x)
        _, vjp = jax.vjp(lambda p, t: block.forward(p, t)[0], *primal)
        auto = vjp(dy)
        hand = (d_params, dx)
        where = f"x ~ {scale:g} * N(0, 1), shape {shape}"
        got, want = jax.tree.structure(hand), jax.tree.structure(auto)
        if got != want or any(
            np.shape(u) != np.shape(v)
            for u, v in zip(jax.tree.leaves(hand), jax.tree.leaves(auto), strict=True)
        ):
            note("auto", np.inf, f"{where}: backward returned {got}, expected {want}")
        else:
            note(
                "auto",
                relative_error(_flat(hand), _flat(auto)),
                _worst_leaf(hand, auto, where),
            )
        # Without parameters only x moves; with them, (params, x) together.
        point, along = (primal, hand) if params is not None else (x, dx)
        dirs = _random_like(k3, point, 4)

        def f(q, dy=dy):
            p, t = q if params is not None else (None, q)
            return jnp.vdot(dy, block.forward(p, t)[0])

        fd = _directional_fd(f, point, dirs)
        proj = np.asarray([_dot(along, d) for d in dirs])
        note("fd", relative_error(proj, fd), where)
        points += 1
    return _report("block", block.name, worst, points)


def _report(kind, name, worst, points) -> VerifyReport:
    (auto, auto_at), (fd, fd_at) = worst["auto"], worst["fd"]
    return VerifyReport(kind, name, auto, fd, auto_at, fd_at, points)


def _worst_leaf(hand, auto, where: str) -> str:
    """Which gradient (a parameter leaf or dx) disagrees most, and where in it."""
    named = jax.tree_util.tree_leaves_with_path(hand)
    worst = max(
        zip(named, jax.tree.leaves(auto), strict=True),
        key=lambda pair: relative_error(pair[0][1], pair[1]),
    )
    (path, u), v = worst
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    i = tuple(int(j) for j in np.unravel_index(int(np.argmax(np.abs(u - v))), u.shape))
    name = "dx" if path[0].idx == 1 else "dparams" + jax.tree_util.keystr(path[1:])
    return (
        f"{name}{list(i)} with {where}: hand {float(u[i]):.6g}, "
        f"jax.vjp {float(v[i]):.6g}"
    )


def _flat(tree) -> np.ndarray:
    return np.concatenate(
        [np.ravel(np.asarray(t, np.float64)) for t in jax.tree.leaves(tree)]
    )
