"""Every ```python block of README.md runs as written on a fresh machine.

Each block runs in its own fresh Python process (no test-session config:
64-bit mode off, a user's defaults), in its own temporary working folder,
with the repository on PYTHONPATH. So a float64 example that lacks its
``jax.config.update("jax_enable_x64", True)`` line fails here. A block whose
first line is ``# needs: torch`` is skipped when torch is not installed; one
whose first line is ``# needs: run`` gets a small run folder ``run/`` (made
once per session with ``fnnet train --data digits --epochs 2 --out run``).
The worked examples (``<!-- example:NAME -->`` followed by a ```text block)
must print exactly what the README shows. Like the rest of the suite, blocks
compile with XLA's backend optimizations off and share the session's compilation
cache (tests/conftest.py), except the worked examples, whose printed numbers
are compared with XLA's defaults.

The defaults table of the README is generated from ``TrainConfig``'s fields
and docstring and the flags of ``fnnet train``.
"""

import dataclasses
import fcntl
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from fnnet.cli import build_parser
from fnnet.train import TrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```\n", re.S | re.M)
EXAMPLE = re.compile(
    r"<!-- example:(\w+) -->\n```python\n(.*?)```\n\n```text\n(.*?)```", re.S
)
NEEDS = ("torch", "run")
RUN_COMMAND = ["-m", "fnnet", "train", "--data", "digits", "--epochs", "2"]
RUN_COMMAND += ["--out", "run", "--quiet"]


@dataclasses.dataclass(frozen=True)
class CodeBlock:
    line: int  # README line of the opening fence
    code: str
    needs: str | None  # "torch", "run" or None
    shown: str | None  # the output a worked example must print, if any


def python_blocks(text: str) -> list[CodeBlock]:
    """The ```python blocks of a Markdown text, in order.

    Raises:
      ValueError: a ``# needs:`` line names something other than ``NEEDS``.
    """
    shown = {code: out for _, code, out in EXAMPLE.findall(text)}
    blocks = []
    for m in FENCE.finditer(text):
        code = m.group(1)
        line = text.count("\n", 0, m.start()) + 1
        first = code.split("\n", 1)[0].strip()
        needs = None
        if first.startswith("# needs:"):
            needs = first.removeprefix("# needs:").strip()
            if needs not in NEEDS:
                raise ValueError(
                    f"README.md line {line + 1}: '# needs: {needs}' is not one of "
                    f"{NEEDS}"
                )
        blocks.append(CodeBlock(line, code, needs, shown.get(code)))
    return blocks


BLOCKS = python_blocks(README.read_text())


def _env(xla_defaults: bool = False) -> dict:
    env = dict(os.environ)
    env.pop("JAX_ENABLE_X64", None)  # a fresh machine's default
    if xla_defaults:  # else as the rest of the suite compiles (tests/conftest.py)
        for name in ("JAX_DISABLE_MOST_OPTIMIZATIONS", "JAX_COMPILATION_CACHE_DIR"):
            env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    return env


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, worker_id):
    """A small finished training run, made once for the blocks that need one.

    Once per session: under pytest-xdist the first worker to ask makes it in
    the session's shared temporary folder, and the others wait for it (a
    lock) and reuse it. Blocks copy it, so none changes another's.
    """
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # this session's folder, above each worker's own
    where = root / "readme-run"
    with open(root / "readme-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (where / "run" / "metrics.json").exists():
            shutil.rmtree(where, ignore_errors=True)  # a failed attempt's
            where.mkdir()
            subprocess.run(
                [sys.executable, *RUN_COMMAND],
                cwd=where,
                env=_env(),
                capture_output=True,
                text=True,
                timeout=300,
                check=True,
            )
    return where / "run"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b.line}" for b in BLOCKS])
def test_readme_python_block_runs(block, tmp_path, request):
    if block.needs == "torch" and importlib.util.find_spec("torch") is None:
        pytest.skip("needs torch")
    if block.needs == "run":
        shutil.copytree(request.getfixturevalue("run_folder"), tmp_path / "run")
    script = tmp_path / f"readme_line{block.line}.py"
    script.write_text(block.code)
    result = subprocess.run(
        [sys.executable, script.name],
        cwd=tmp_path,
        env=_env(xla_defaults=block.shown is not None),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, (
        f"README.md block at line {block.line} failed (exit {result.returncode}; "
        f"its line k is README line {block.line} + k):\n{result.stderr}"
    )
    if block.shown is not None:
        assert result.stdout == block.shown, (
            f"README.md example at line {block.line} printed:\n{result.stdout}"
        )


def test_worked_examples_print_what_the_readme_shows():
    # The comparison itself runs in test_readme_python_block_runs, each example
    # in a fresh process; here: both examples are found and compared.
    examples = EXAMPLE.findall(README.read_text())
    assert [name for name, _, _ in examples] == ["activation", "block"]
    compared = [b for b in BLOCKS if b.shown is not None]
    assert [b.code for b in compared] == [code for _, code, _ in examples]


def test_block_markers_are_parsed():
    text = (
        "intro\n```python\nprint(1)\n```\n\n```python\n# needs: torch\nimport torch\n"
        "```\n```python\n# needs: run\nprint(2)\n```\n"
        '<!-- example:x -->\n```python\nprint("a")\n```\n\n```text\na\n```\n'
    )
    got = [(b.line, b.needs, b.shown) for b in python_blocks(text)]
    assert got == [
        (2, None, None),
        (6, "torch", None),
        (10, "run", None),
        (15, None, "a\n"),
    ]
    with pytest.raises(ValueError, match="line 2: '# needs: gpu' is not one of"):
        python_blocks("```python\n# needs: gpu\n```\n")


# ------------------------------------------------------------ defaults table

TABLE = re.compile(
    r"<!-- defaults-table:start -->\n(.*?)<!-- defaults-table:end -->", re.S
)


def _field_docs() -> dict:
    """Each TrainConfig field's description, from the class docstring."""
    doc = TrainConfig.__doc__.split("Attributes:", 1)[1]
    items = re.findall(r"^ {6}(\w+): (.*?)(?=^ {6}\w+:|\Z)", doc, re.S | re.M)
    return {name: " ".join(text.split()).replace("``", "`") for name, text in items}


def defaults_table() -> str:
    """The README's defaults table: TrainConfig's fields and fnnet train's flags."""
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {a.dest: a.option_strings[0] for a in train._actions if a.option_strings}
    docs = _field_docs()
    rows = [
        "| setting | `TrainConfig` | `fnnet train` | default |",
        "|---|---|---|---|",
    ]
    for field in dataclasses.fields(TrainConfig):
        flag = flags["lr" if field.name == "learning_rate" else field.name]
        rows.append(
            f"| {docs[field.name]} | `{field.name}` | `{flag}` | `{field.default!r}` |"
        )
    return "\n".join(rows) + "\n"


def test_readme_defaults_table_is_trainconfigs():
    found = TABLE.search(README.read_text())
    assert found, "README.md has no defaults-table markers"
    expected = defaults_table()
    assert found.group(1) == expected, (
        "README.md's defaults table differs from TrainConfig; it should read:\n"
        + expected
    )
