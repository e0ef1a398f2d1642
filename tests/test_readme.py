"""The README's worked examples run and print exactly what the README shows."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = re.compile(
    r"<!-- example:(\w+) -->\n```python\n(.*?)```\n\n```text\n(.*?)```", re.S
)
SEPARATOR = "=== next example ==="


def test_worked_examples_print_what_the_readme_shows():
    examples = EXAMPLE.findall((ROOT / "README.md").read_text())
    assert [name for name, _, _ in examples] == ["activation", "block"]
    # One fresh process (no test-session config: a user's defaults), each
    # example in its own namespace.
    program = "\n".join(
        f"exec({code!r}, {{'__name__': '__main__'}})\nprint({SEPARATOR!r})"
        for _, code, _ in examples
    )
    out = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    ).stdout
    printed = out.split(SEPARATOR + "\n")[:-1]
    for (name, _, shown), got in zip(examples, printed, strict=True):
        assert got == shown, f"README example {name!r} printed:\n{got}"
