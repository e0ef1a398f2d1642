"""Mutation check: plant known bugs, one at a time, and count the ones the tests catch.

``python -m experiments --only mutation`` (not part of the default studies,
not run in CI). The package, the tests and what they read are copied to a
temporary folder (one copy per worker); each mutant of :data:`CATALOGUE`
replaces one exact piece of source there, runs the tests that should notice
(``pytest -x``, targeted files and ``-k`` selections), and restores the file.
A mutant is *killed* when those tests fail, and *survives* when they pass.
Before any mutant, the same selections must pass on the unmodified copy.

Every mutation is an exact string replacement that must match exactly once:
when the source has moved, the check stops and names the mutant, rather than
counting a bug that was never planted. Writes ``mutation.csv`` and
``mutation.md`` under the output folder.
"""

from __future__ import annotations

import concurrent.futures
import csv
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
#: What a copy needs: the package, the tests and the files the tests read.
COPIED = ("fnnet", "tests", "docs", "README.md", "pyproject.toml")
#: Seconds one mutant's tests may run before it counts as killed by a hang.
TIMEOUT_S = 900
JOBS = 2


class Mutant(NamedTuple):
    name: str  # short id
    area: str  # the part of the catalogue it belongs to
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, "-k" expressions


def _k(path: str, expr: str) -> tuple[str, ...]:
    return (path, "-k", expr)


ACT = "fnnet/activations.py"
LOSS = "fnnet/losses.py"
BW = "fnnet/backward.py"
TRAIN = "fnnet/train.py"
CLI = "fnnet/cli.py"
T_ACT = _k("tests/test_activations.py", "h_prime")
T_DELTA = _k("tests/test_losses.py", "output_delta or general_rule or canonical")
T_NET = _k("tests/test_network.py", "backprop or hand_worked or input_grad")
T_STEP = _k("tests/test_train.py", "step or l2 or decay")
T_CLI_FLAGS = _k("tests/test_cli.py", "flags_reach_fit")

CATALOGUE: tuple[Mutant, ...] = (
    # --- the derivation: every h' ------------------------------------------------
    Mutant(
        "identity_prime",
        "h'",
        ACT,
        "    return jnp.ones_like(a)",
        "    return jnp.full_like(a, 0.5)",
        T_ACT,
    ),
    Mutant(
        "sigmoid_prime",
        "h'",
        ACT,
        "    return _logistic(a) * _logistic(-a)",
        "    return _logistic(a) * (1.0 - _logistic(a)) ** 2",
        T_ACT,
    ),
    Mutant(
        "tanh_prime",
        "h'",
        ACT,
        "return 4.0 * (_logistic(2.0 * a) * _logistic(-2.0 * a))",
        "return 4.0 * (_logistic(a) * _logistic(-a))",
        T_ACT,
    ),
    Mutant(
        "relu_prime_at_zero",
        "h'",
        ACT,
        "return jnp.where(a > 0, 1.0, 0.0).astype(a.dtype)",
        "return jnp.where(a >= 0, 1.0, 0.0).astype(a.dtype)",
        T_ACT,
    ),
    Mutant(
        "leaky_relu_prime",
        "h'",
        ACT,
        "return jnp.where(a > 0, 1.0, LEAKY_SLOPE).astype(a.dtype)",
        "return jnp.where(a > 0, 1.0, 0.0).astype(a.dtype)",
        T_ACT,
    ),
    Mutant(
        "softplus_prime",
        "h'",
        ACT,
        '"""softplus\'(a) = sigma(a)."""\n    return _logistic(a)',
        '"""softplus\'(a) = sigma(a)."""\n    return _logistic(-a)',
        T_ACT,
    ),
    Mutant(
        "elu_prime",
        "h'",
        ACT,
        "1.0, ELU_ALPHA * jnp.exp(jnp.where(a > 0, 0.0, a)))",
        "1.0, ELU_ALPHA * jnp.expm1(jnp.where(a > 0, 0.0, a)))",
        T_ACT,
    ),
    Mutant(
        "gelu_prime",
        "h'",
        ACT,
        "return _std_normal_cdf(a) + a * (",
        "return _std_normal_cdf(a) + 0.5 * a * (",
        T_ACT,
    ),
    Mutant(
        "activation_block_forgets_h_prime",
        "h'",
        ACT,
        "return None, self.h_prime(a) * dz",
        "return None, dz",
        T_NET,
    ),
    # --- the derivation: output deltas ---------------------------------------------
    Mutant(
        "canonical_delta_sign",
        "output delta",
        LOSS,
        "return yhat - y  # eq. 7",
        "return y - yhat  # eq. 7",
        T_DELTA,
    ),
    Mutant(
        "softmax_rule_drops_projection",
        "output delta",
        LOSS,
        "return yhat * (g - jnp.sum(g * yhat, axis=-1, keepdims=True))",
        "return yhat * g",
        T_DELTA,
    ),
    Mutant(
        "elementwise_rule_forgets_h_prime",
        "output delta",
        LOSS,
        "return ACTIVATIONS[output].h_prime(a) * g  # eq. 5",
        "return g  # eq. 5",
        T_DELTA,
    ),
    Mutant(
        "user_output_forgets_h_prime",
        "output delta",
        LOSS,
        "return output.h_prime(a) * g  # eq. 5",
        "return g  # eq. 5",
        _k("tests/test_extensions.py", "hand_gradients or dropout_per_example"),
    ),
    Mutant(
        "mse_grad_sign",
        "output delta",
        LOSS,
        '    if loss == "mse":\n        return yhat - y\n',
        '    if loss == "mse":\n        return y - yhat\n',
        T_DELTA,
    ),
    Mutant(
        "every_mse_pair_treated_as_canonical",
        "output delta",
        LOSS,
        "return isinstance(output, str) and (output, loss) in CANONICAL_PAIRS",
        "return isinstance(output, str) and ((output, loss) in CANONICAL_PAIRS"
        ' or loss == "mse")',
        T_DELTA,
    ),
    # --- the derivation: weight and bias gradients, dropout --------------------------
    Mutant(
        "bias_grad_mean",
        "gradients",
        BW,
        "return jnp.sum(delta, axis=0)",
        "return jnp.mean(delta, axis=0)",
        T_NET,
    ),
    Mutant(
        "weight_grad_one_example_halved",
        "gradients",
        BW,
        "return jnp.outer(delta, z_prev)",
        "return 0.5 * jnp.outer(delta, z_prev)",
        T_NET,
    ),
    Mutant(
        "weight_grad_batch_divided",
        "gradients",
        BW,
        "jax.lax.optimization_barrier(delta.T), z_prev, precision=precision\n    )",
        "jax.lax.optimization_barrier(delta.T), z_prev, precision=precision\n"
        "    ) / delta.shape[0]",
        T_NET,
    ),
    Mutant(
        "input_grad_without_W",
        "gradients",
        BW,
        "return jnp.matmul(delta, W, precision=precision)",
        "return jnp.matmul(delta, jnp.ones_like(W), precision=precision)",
        T_NET,
    ),
    Mutant(
        "dropout_backward_ignores_mask",
        "gradients",
        BW,
        "return None, dz * mask",
        "return None, dz",
        _k("tests/test_network.py", "dropout"),
    ),
    # --- the training step -----------------------------------------------------------
    Mutant(
        "l2_grad_halved",
        "training",
        TRAIN,
        "lambda g, theta: g + alpha * theta, grads",
        "lambda g, theta: g + 0.5 * alpha * theta, grads",
        T_STEP,
    ),
    Mutant(
        "l2_penalty_doubled",
        "training",
        TRAIN,
        "return 0.5 * config.l2 * total",
        "return config.l2 * total",
        T_STEP,
    ),
    Mutant(
        "weight_decay_on_biases",
        "training",
        TRAIN,
        "new = _map_decayed(lambda t, theta: t - beta * theta, new, params, config)",
        "new = jax.tree.map(lambda t, theta: t - beta * theta, new, params)",
        T_STEP,
    ),
    Mutant(
        "decay_biases_ignored",
        "training",
        TRAIN,
        'return path[-1].key == "W" or config.decay_biases',
        'return path[-1].key == "W"',
        T_STEP,
    ),
    Mutant(
        "weight_decay_of_the_updated_value",
        "training",
        TRAIN,
        "lambda t, theta: t - beta * theta, new, params, config",
        "lambda t, theta: t - beta * t, new, params, config",
        T_STEP,
    ),
    Mutant(
        "grad_auto_runs_the_hand_gradient",
        "training",
        TRAIN,
        'if config.grad == "hand":',
        'if config.grad in ("hand", "auto"):',
        _k("tests/test_cli.py", "grad_auto_trains"),
    ),
    Mutant(
        "input_noise_unscaled",
        "training",
        TRAIN,
        "x = x + jnp.asarray(std, x.dtype) * noise",
        "x = x + noise",
        _k("tests/test_train.py", "noise"),
    ),
    Mutant(
        "early_stopping_returns_last_params",
        "training",
        TRAIN,
        "params=loop.best_params if config.patience is not None else state.params",
        "params=state.params",
        _k("tests/test_train.py", "early"),
    ),
    Mutant(
        "early_stopping_off_by_one",
        "training",
        TRAIN,
        "& ~carry.done & (carry.bad_epochs < patience)",
        "& ~carry.done & (carry.bad_epochs <= patience)",
        _k("tests/test_train.py", "early"),
    ),
    Mutant(
        "same_shuffle_every_epoch",
        "training",
        TRAIN,
        "key = epoch_key(base_key, epoch)",
        "key = epoch_key(base_key, 1)",
        _k("tests/test_train.py", "shuffle or epoch"),
    ),
    Mutant(
        "no_shuffle",
        "training",
        TRAIN,
        "perm = epoch_permutation(key, n, B)",
        "perm = jnp.arange(nb * B, dtype=jnp.uint32).reshape(nb, B)",
        _k("tests/test_train.py", "shuffle or epoch"),
    ),
    Mutant(
        "non_finite_epoch_kept",
        "training",
        TRAIN,
        "(body, state, (Xb, Yb, keys))\n"
        "    ok = jnp.all(jnp.isfinite(batch_losses))"
        " & _all_finite(new_state.params)\n",
        "(body, state, (Xb, Yb, keys))\n    ok = jnp.array(True)\n",
        _k("tests/test_train.py", "non_finite"),
    ),
    # --- data ------------------------------------------------------------------------
    Mutant(
        "scaling_statistics_from_every_split",
        "data",
        "fnnet/data.py",
        "    mean = x_train.mean(axis=0)\n    std = x_train.std(axis=0)\n",
        "    mean = np.concatenate([x_train, *others]).mean(axis=0)\n"
        "    std = np.concatenate([x_train, *others]).std(axis=0)\n",
        _k("tests/test_data.py", "standardize or statistics"),
    ),
    Mutant(
        "scaling_std_ddof",
        "data",
        "fnnet/data.py",
        "    std = x_train.std(axis=0)\n",
        "    std = x_train.std(axis=0, ddof=1)\n",
        _k("tests/test_data.py", "standardize or statistics"),
    ),
    # --- checkpoints -----------------------------------------------------------------
    Mutant(
        "checkpoint_written_in_place",
        "checkpoint",
        "fnnet/checkpoint.py",
        '        with os.fdopen(fd, "wb") as f:\n'
        "            write(f)\n"
        "            f.flush()\n"
        "            os.fsync(f.fileno())\n"
        "        os.chmod(tmp, mode)  # mkstemp made it 0600\n"
        "        os.replace(tmp, path)\n",
        "        os.close(fd)\n"
        "        tmp.unlink()\n"
        '        with open(path, "wb") as f:\n'
        "            write(f)\n"
        "            f.flush()\n"
        "            os.fsync(f.fileno())\n"
        "        os.chmod(path, mode)\n",
        _k("tests/test_checkpoint.py", "replace or halfway or whole or save"),
    ),
    Mutant(
        "checkpoint_temp_file_left_behind",
        "checkpoint",
        "fnnet/checkpoint.py",
        "        with contextlib.suppress(OSError):\n            tmp.unlink()\n",
        "        pass\n",
        _k("tests/test_checkpoint.py", "replace or halfway or whole"),
    ),
    Mutant(
        "checkpoint_leaf_dtype_unchecked",
        "checkpoint",
        "fnnet/checkpoint.py",
        "if arr.shape != want_shape or arr.dtype != want_dtype:",
        "if arr.shape != want_shape:",
        _k("tests/test_checkpoint.py", "mismatch or different or float64"),
    ),
    Mutant(
        "checkpoint_extra_leaves_allowed",
        "checkpoint",
        "fnnet/checkpoint.py",
        "        if missing or extra:\n",
        "        if missing:\n",
        _k("tests/test_checkpoint.py", "mismatch or different"),
    ),
    # --- the graph module ------------------------------------------------------------
    Mutant(
        "graph_mul_partials_swapped",
        "graph",
        "fnnet/graph.py",
        "lambda x, y: x * y, lambda x, y: (y, x)),",
        "lambda x, y: x * y, lambda x, y: (x, y)),",
        ("tests/test_graph.py",),
    ),
    Mutant(
        "graph_div_partial_sign",
        "graph",
        "fnnet/graph.py",
        "(_div(1.0, y), -x * _div(1.0, y * y))",
        "(_div(1.0, y), x * _div(1.0, y * y))",
        ("tests/test_graph.py",),
    ),
    Mutant(
        "graph_paths_not_summed",
        "graph",
        "fnnet/graph.py",
        "grads[node] = sum(\n            grads[s] * s.local_grads[node]",
        "grads[node] = max(\n            grads[s] * s.local_grads[node]",
        ("tests/test_graph.py",),
    ),
    # --- the CLI's flags reaching fit -----------------------------------------------
    Mutant(
        "cli_grad_flag_dropped",
        "cli",
        CLI,
        'grad=s["grad"],',
        'grad="hand",',
        _k("tests/test_cli.py", "grad_auto_trains or flags_reach_fit"),
    ),
    Mutant("cli_l2_dropped", "cli", CLI, 'l2=s["l2"],', "l2=0.0,", T_CLI_FLAGS),
    Mutant(
        "cli_weight_decay_dropped",
        "cli",
        CLI,
        'weight_decay=s["weight_decay"],',
        "weight_decay=0.0,",
        T_CLI_FLAGS,
    ),
    Mutant(
        "cli_decay_biases_dropped",
        "cli",
        CLI,
        'decay_biases=s["decay_biases"],',
        "decay_biases=False,",
        T_CLI_FLAGS,
    ),
    Mutant(
        "cli_patience_dropped",
        "cli",
        CLI,
        'patience=s["patience"] or None,',
        "patience=None,",
        T_CLI_FLAGS,
    ),
    Mutant(
        "cli_batch_size_dropped",
        "cli",
        CLI,
        'batch_size=s["batch_size"],',
        "batch_size=32,",
        T_CLI_FLAGS,
    ),
    Mutant(
        "cli_noise_dropped",
        "cli",
        CLI,
        'noise_std=s["noise_std"],',
        "noise_std=0.0,",
        T_CLI_FLAGS,
    ),
)


class Outcome(NamedTuple):
    mutant: Mutant
    status: str  # "killed", "survived", "timeout"
    seconds: float
    detail: str  # the last line pytest printed


def make_copy(dest: Path) -> Path:
    """A copy of what the tests need, under ``dest``."""
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(
                src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def check_catalogue(catalogue=CATALOGUE) -> None:
    """Every mutation matches its file exactly once; fail loudly otherwise."""
    names = [m.name for m in catalogue]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate mutant names: {duplicates}")
    for m in catalogue:
        count = (ROOT / m.file).read_text().count(m.old)
        if count != 1:
            raise ValueError(
                f"mutant {m.name!r}: the pattern occurs {count} times in {m.file} "
                f"(must be exactly once; has the source moved?): {m.old!r}"
            )


def run_pytest(copy: Path, args: tuple[str, ...], timeout: float):
    """(returncode or None on timeout, last output line, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [*cmd, *args],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout:.0f} s", time.perf_counter() - start
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    return proc.returncode, (lines[-1] if lines else ""), time.perf_counter() - start


def run_mutant(copy: Path, m: Mutant, timeout: float = TIMEOUT_S) -> Outcome:
    path = copy / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        raise ValueError(f"mutant {m.name!r}: pattern not found once in the copy")
    path.write_text(original.replace(m.old, m.new))
    try:
        code, last, seconds = run_pytest(copy, m.tests, timeout)
    finally:
        path.write_text(original)
    if code is None:
        status = "timeout"
    elif code == 0:
        status = "survived"
    elif code == 5:  # no test collected: the selection is stale, not a kill
        raise ValueError(f"mutant {m.name!r}: no test selected by {m.tests}")
    else:
        status = "killed"
    return Outcome(m, status, seconds, last)


def selections(catalogue) -> list[tuple[str, ...]]:
    seen: list[tuple[str, ...]] = []
    for m in catalogue:
        if m.tests not in seen:
            seen.append(m.tests)
    return seen


def mutate(catalogue=CATALOGUE, jobs: int = JOBS, progress=None) -> list[Outcome]:
    """Run every mutant in ``jobs`` copies; the selections must pass first."""
    check_catalogue(catalogue)
    progress = progress or (lambda it, desc: it)
    with tempfile.TemporaryDirectory(prefix="fnnet-mutation-") as tmp:
        copies: queue.Queue[Path] = queue.Queue()
        for i in range(jobs):
            copies.put(make_copy(Path(tmp) / f"copy{i}"))

        def with_copy(fn, *args):
            copy = copies.get()
            try:
                return fn(copy, *args)
            finally:
                copies.put(copy)

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            clean = list(
                pool.map(
                    lambda a: with_copy(run_pytest, a, TIMEOUT_S),
                    selections(catalogue),
                )
            )
            for args, (code, last, _) in zip(selections(catalogue), clean, strict=True):
                if code != 0:
                    raise RuntimeError(
                        f"the tests {' '.join(args)} fail on unmodified code "
                        f"({last}); fix them before measuring mutants"
                    )
            futures = [pool.submit(with_copy, run_mutant, m) for m in catalogue]
            done = progress(concurrent.futures.as_completed(futures), "mutants")
            outcomes = {id(f.result().mutant): f.result() for f in done}
    return [outcomes[id(m)] for m in catalogue]


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *COPIED, "experiments"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"


def write_results(
    out: Path, outcomes: list[Outcome], seconds: float, revision: str
) -> str:
    rows = [
        dict(
            mutant=o.mutant.name,
            area=o.mutant.area,
            file=o.mutant.file,
            status=o.status,
            seconds=f"{o.seconds:.1f}",
            tests=" ".join(o.mutant.tests),
            pytest=o.detail,
        )
        for o in outcomes
    ]
    with open(out / "mutation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    killed = sum(o.status != "survived" for o in outcomes)
    rate = killed / len(outcomes)
    headline = f"mutation: {killed}/{len(outcomes)} planted bugs caught ({rate:.0%})"
    areas = sorted({o.mutant.area for o in outcomes})
    lines = [
        "# Mutation check: planted bugs the tests catch",
        "",
        "Generated by `python -m experiments --only mutation`; do not edit. Each "
        "mutant is one exact replacement in a copy of the source, run against the "
        "tests listed for it (`pytest -x`); killed = those tests fail.",
        "",
        f"**{headline}**, measured at revision {revision}, in {seconds:.0f} s.",
        "",
        "| area | caught |",
        "|---|---|",
    ]
    for area in areas:
        mine = [o for o in outcomes if o.mutant.area == area]
        caught = sum(o.status != "survived" for o in mine)
        lines.append(f"| {area} | {caught}/{len(mine)} |")
    lines += ["", "| mutant | file | status | tests |", "|---|---|---|---|"]
    for o in outcomes:
        tests = " ".join(o.mutant.tests).replace("|", "\\|")
        lines.append(f"| {o.mutant.name} | {o.mutant.file} | {o.status} | `{tests}` |")
    survivors = [o for o in outcomes if o.status == "survived"]
    lines += [
        "",
        "Survivors: " + (", ".join(o.mutant.name for o in survivors) or "none"),
    ]
    (out / "mutation.md").write_text("\n".join(lines) + "\n")
    return headline


def run(out: Path, quick: bool, progress) -> list[str]:
    """The study entry point of ``python -m experiments --only mutation``."""
    start, revision = time.perf_counter(), git_revision()  # what gets copied
    outcomes = mutate(CATALOGUE, JOBS, progress)
    return [write_results(out, outcomes, time.perf_counter() - start, revision)]
