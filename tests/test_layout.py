"""The design's boundaries: modules talk through public names only.

Walks fnnet/, experiments/ and tests/ with ``ast``. A private name (one
leading underscore, not a dunder) defined in one of these files may be used
only in the file that defines it; a module's own private names and those of
other libraries (JAX's ``_cache_size``, ...) are fine.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIRS = ("fnnet", "experiments", "tests")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _files():
    return sorted(p for d in DIRS for p in (ROOT / d).rglob("*.py"))


def _defined(tree: ast.AST) -> set[str]:
    """Private names a file defines: functions, classes, assignments, attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[0])
    return {n for n in names if _private(n)}


def _uses(tree: ast.AST):
    """(line, name, how) for every private name a file reads from elsewhere."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if _private(alias.name):
                    yield node.lineno, alias.name, f"from {node.module} import"
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            yield node.lineno, node.attr, "attribute"


def violations(files) -> list[str]:
    trees = {p: ast.parse(p.read_text(), str(p)) for p in files}
    own = {p: _defined(t) for p, t in trees.items()}
    # Private names imported by an ``from x import _y`` count as uses, not
    # definitions: drop them from the importing file's own set.
    for p, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                own[p] -= {a.asname or a.name for a in node.names}
    project = set().union(*own.values())
    found = []
    for p, tree in trees.items():
        for line, name, how in _uses(tree):
            if how.startswith("from") or (name in project and name not in own[p]):
                where = p.relative_to(ROOT) if p.is_relative_to(ROOT) else p
                found.append(f"{where}:{line}: {how} {name}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = violations(_files())
    assert not found, "private names used across modules:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from fnnet.network import _prepare\n", "from fnnet.network import _prepare"),
        ("import fnnet.train as t\nt._run_epoch_jit()\n", "attribute _run_epoch_jit"),
        ("def f(net):\n    net._check_x(1)\n", "attribute _check_x"),
    ],
)
def test_the_check_catches_cross_module_access(tmp_path, source, expected):
    user = tmp_path / "user.py"
    user.write_text(source)
    owner = tmp_path / "owner.py"
    owner.write_text(
        "def _prepare(): ...\ndef _run_epoch_jit(): ...\n"
        "class MLP:\n    def _check_x(self, x):\n        return self._check_y(x)\n"
        "    def _check_y(self, y):\n        return y\n"
    )
    found = violations([user, owner])
    assert any(expected in f for f in found), found
    # The owner's own uses (self._check_y) and JAX-style foreign privates pass.
    assert not any("owner.py" in f for f in found)


def test_foreign_private_attributes_are_allowed(tmp_path):
    user = tmp_path / "user.py"
    user.write_text("import jax\nf = jax.jit(abs)\nf._cache_size()\n")
    assert violations([user]) == []
