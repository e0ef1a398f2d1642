"""Gradient verification: hand-written vs ``jax.grad`` vs central finite differences.

The relative error between two gradients u and v of one leaf is

    rel(u, v) = ||u - v||_2 / max(||u||_2, ||v||_2)        (0 when both are 0)

(docs/derivation.md#verification, eq. 23)
a number in [0, 2] that is scale-free and does not blow up on single entries
that happen to be near zero.

Finite differences (FD) are central, ``(J(theta + eps e) - J(theta - eps e)) /
(2 eps)`` (eq. 24). For a leaf with at most ``max_fd_coords`` entries every coordinate
is perturbed ("full") and the FD gradient is compared whole. For a larger leaf
the comparison is made in ``directions`` random unit directions v of that leaf:
the vectors of directional derivatives ``<g, v>`` and their FD estimates are
compared with the same formula. FD in float32 is only good to about 1e-3
relative (rounding error eps_mach / eps); use float64 parameters for a sharp
check.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fnnet import core
from fnnet import precision as mp
from fnnet.network import MLP
from fnnet.types import Array, Params

#: Default FD step per dtype: about eps_mach^(1/3), balancing truncation and rounding.
DEFAULT_EPS = {
    jnp.dtype(jnp.float64): 1e-5,
    jnp.dtype(jnp.float32): 1e-2,
    jnp.dtype(jnp.bfloat16): 1e-1,
    jnp.dtype(jnp.float16): 1e-1,
}


def relative_error(u, v) -> float:
    """rel(u, v) = ||u - v|| / max(||u||, ||v||), computed in float64 on the host."""
    u = np.asarray(u, dtype=np.float64).ravel()
    v = np.asarray(v, dtype=np.float64).ravel()
    scale = max(np.linalg.norm(u), np.linalg.norm(v))
    return 0.0 if scale == 0.0 else float(np.linalg.norm(u - v) / scale)


@dataclasses.dataclass(frozen=True)
class LeafCheck:
    """One row of a :class:`GradcheckReport`: one leaf of one layer."""

    layer: int  # 1-based, as l in docs/derivation.md
    leaf: str  # "W", "b", or a hidden block's leaf as "name['key']"
    shape: tuple[int, ...]
    norm: float  # ||hand gradient||
    hand_vs_auto: float
    hand_vs_fd: float  # nan when finite differences were skipped
    auto_vs_fd: float
    fd: str  # "full", "k dirs" or "-"


@dataclasses.dataclass(frozen=True)
class GradcheckReport:
    """Per-layer, per-leaf relative errors; ``str(report)`` is a table."""

    rows: tuple[LeafCheck, ...]
    dtype: str
    eps: float
    #: The matrix-product precision both gradients were computed at.
    precision: str = "platform default"

    #: The columns :meth:`worst` accepts: the relative errors of each row.
    COLUMNS = ("hand_vs_auto", "hand_vs_fd", "auto_vs_fd")

    def worst(self, column: str = "hand_vs_auto") -> float:
        """Largest relative error of one column over every leaf.

        Args:
          column: ``"hand_vs_auto"`` (hand-written vs ``jax.grad``),
            ``"hand_vs_fd"`` (hand-written vs finite differences) or
            ``"auto_vs_fd"`` (``jax.grad`` vs finite differences): the
            table's hand-auto, hand-fd and auto-fd columns.

        Returns:
          The largest value; 0.0 for a report without rows, nan for an FD
          column of a check run with ``fd=False``.

        Raises:
          ValueError: ``column`` is not one of ``COLUMNS``; the message lists
            them.
        """
        if column not in self.COLUMNS:
            raise ValueError(
                f"column must be one of {', '.join(self.COLUMNS)}, got {column!r}"
            )
        values = [getattr(r, column) for r in self.rows]
        return max(values) if values else 0.0

    def table(self) -> str:
        w = max([4, *(len(r.leaf) for r in self.rows)])
        head = (
            f"{'layer':>5}  {'leaf':<{w}} {'shape':<14} {'|grad|':>9}  "
            f"{'hand-auto':>9}  {'hand-fd':>9}  {'auto-fd':>9}  fd"
        )
        lines = [
            f"gradcheck ({self.dtype}, fd eps={self.eps:g}); matmul precision "
            f"{self.precision}; rel(u, v) = ||u - v|| / max(||u||, ||v||)"
        ]
        lines += [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.layer:>5}  {r.leaf:<{w}} {str(r.shape):<14} {r.norm:9.2e}  "
                f"{r.hand_vs_auto:9.2e}  {r.hand_vs_fd:9.2e}  "
                f"{r.auto_vs_fd:9.2e}  {r.fd}"
            )
        lines.append(
            f"worst: hand-auto {self.worst('hand_vs_auto'):.2e}, "
            f"hand-fd {self.worst('hand_vs_fd'):.2e}, "
            f"auto-fd {self.worst('auto_vs_fd'):.2e}"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def gradcheck(
    net: MLP,
    params: Params,
    x: Array,
    y: Array,
    *,
    key: Array | None = None,
    fd: bool = True,
    eps: float | None = None,
    max_fd_coords: int = 1024,
    directions: int = 16,
    fd_key: Array | None = None,
    precision=mp.CHECK_PRECISION,
) -> GradcheckReport:
    """Compare hand-written, automatic and finite-difference gradients of J.

    Args:
      net: the network.
      params: its parameters; their dtype sets the precision of the check.
      x, y: a batch (or one example) as for :meth:`MLP.backprop`.
      key: dropout key: the same masks are used by all three methods.
      fd: also compute central finite differences.
      eps: FD step; default ``DEFAULT_EPS`` for the parameters' dtype.
      max_fd_coords: leaves with at most this many entries get full FD.
      directions: number of random directions for larger leaves.
      fd_key: PRNG key of those directions (default: key 0).
      precision: the matrix-product precision of all three methods (see
        :mod:`fnnet.precision`): "highest" by default, so that a float32
        check on a GPU measures the derivation and not TF32's rounding; pass
        ``net.precision`` to check the network as it trains.

    Returns:
      A :class:`GradcheckReport` with one row per (layer, leaf).
    """
    x, y = net.validate(params, x, y, key=key)
    net = dataclasses.replace(net, precision=mp.check(precision))
    dtype = jnp.dtype(params[0]["W"].dtype)
    eps = float(DEFAULT_EPS.get(dtype, 1e-3) if eps is None else eps)
    fd_key = jax.random.key(0) if fd_key is None else fd_key
    hand, auto, fd_out = _compare(
        net, params, x, y, key, fd_key, eps, fd, max_fd_coords, directions
    )
    rows = []
    for l, layer in enumerate(params):
        for name, leaf in leaves_of(layer):
            g_hand = np.asarray(hand[l][name])
            g_auto = np.asarray(auto[l][name])
            nan = float("nan")
            hand_fd = auto_fd = nan
            mode = "-"
            if fd:
                est, proj_hand, proj_auto, full = fd_out[l][name]
                if full:
                    mode = "full"
                    hand_fd = relative_error(g_hand, est)
                    auto_fd = relative_error(g_auto, est)
                else:
                    mode = f"{directions} dirs"
                    hand_fd = relative_error(proj_hand, est)
                    auto_fd = relative_error(proj_auto, est)
            rows.append(
                LeafCheck(
                    layer=l + 1,
                    leaf=name,
                    shape=tuple(leaf.shape),
                    norm=float(np.linalg.norm(g_hand.astype(np.float64))),
                    hand_vs_auto=relative_error(g_hand, g_auto),
                    hand_vs_fd=hand_fd,
                    auto_vs_fd=auto_fd,
                    fd=mode,
                )
            )
    return GradcheckReport(tuple(rows), str(dtype), eps, mp.describe(net.precision))


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9))
def _compare(net, params, x, y, key, fd_key, eps, fd, max_fd_coords, directions):
    x, y = core.prepare(net, params, x, y)
    masks = core.masks_for(net, key, x)
    J = functools.partial(core.cost, net, x=x, y=y, masks=masks)
    hand = core.backprop(net, params, x, y, masks).grads
    auto = jax.grad(lambda p: J(p))(params)
    flat_hand = [dict(leaves_of(layer)) for layer in hand]
    flat_auto = [dict(leaves_of(layer)) for layer in auto]
    if not fd:
        return flat_hand, flat_auto, None
    keys = iter(jax.random.split(fd_key, len(jax.tree.leaves(params))))
    fd_out = []
    for l, layer in enumerate(params):
        named = leaves_of(layer)
        out = {}
        for i, (name, leaf) in enumerate(named):

            def J_at(new_leaf, l=l, i=i, named=named, layer=layer):
                leaves = [t for _, t in named]
                leaves[i] = new_leaf
                p = list(params)
                p[l] = jax.tree.unflatten(jax.tree.structure(layer), leaves)
                return J(tuple(p))

            k = next(keys)
            if leaf.size <= max_fd_coords:
                out[name] = (_fd_full(J_at, leaf, eps), None, None, True)
            else:
                V = _unit_directions(k, directions, leaf)
                est = jax.lax.map(functools.partial(_fd_along, J_at, leaf, eps), V)
                proj_hand = jnp.tensordot(
                    V, flat_hand[l][name], leaf.ndim, precision=net.precision
                )
                proj_auto = jnp.tensordot(
                    V, flat_auto[l][name], leaf.ndim, precision=net.precision
                )
                out[name] = (est, proj_hand, proj_auto, False)
        fd_out.append(out)
    return flat_hand, flat_auto, fd_out


def leaves_of(layer) -> list[tuple[str, Array]]:
    """(name, leaf) of one layer's dict, in pytree order.

    "W" and "b", then a hidden block's leaves as ``"name['key']"``.
    """
    return [
        (path[0].key + jax.tree_util.keystr(path[1:]), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(layer)
    ]


def _unit_directions(key, n, leaf):
    """n random directions of unit Euclidean norm, each shaped like ``leaf``."""
    V = jax.random.normal(key, (n, *leaf.shape), leaf.dtype)
    axes = tuple(range(1, V.ndim))
    return V / jnp.sqrt(jnp.sum(V * V, axis=axes, keepdims=True))


def _fd_along(J_at, leaf, eps, v):
    return _central(J_at, leaf, v * eps)


def _central(J_at, leaf, step):
    """(J(leaf + step) - J(leaf - step)) / (2 |step|), the directional derivative."""
    plus, minus = leaf + step, leaf - step
    # Divide by the step actually taken: leaf + step is rounded.
    taken = jnp.sqrt(jnp.sum(jnp.square(plus - minus)))
    return (J_at(plus) - J_at(minus)) / taken


def _fd_full(J_at, leaf, eps):
    """Central differences in every coordinate of ``leaf``, shaped like it."""
    eye = jnp.eye(leaf.size, dtype=leaf.dtype)
    steps = eye.reshape(leaf.size, *leaf.shape) * jnp.asarray(eps, leaf.dtype)
    batch = max(1, min(leaf.size, 256))
    est = jax.lax.map(lambda s: _central(J_at, leaf, s), steps, batch_size=batch)
    return est.reshape(leaf.shape)
