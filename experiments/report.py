"""Writing the studies' outputs: CSV files and generated blocks of README.md.

A README block sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``;
the scripts that produce a table replace what is between the markers, so the
README's numbers always come from a run, never from typing.
"""

import csv
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def update_block(name: str, body: str, readme: Path = README) -> str:
    """Put ``body`` between the NAME markers of ``readme``; says what was done."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if not readme.exists():
        return f"{name}: {readme} not found; README left alone"
    text = readme.read_text()
    if start not in text or end not in text:
        return f"{name}: markers {start} / {end} not in {readme.name}; left alone"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    body = body if body.endswith("\n") else body + "\n"
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(f"{head}{start}\n{body}{end}{tail}")
    tmp.replace(readme)
    return f"{name}: rewrote its block of {readme.name}"


def write_csv(path, rows: list[dict], digits: int = 6) -> None:
    """Rows of dicts to a CSV file; floats with ``digits`` significant digits."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: f"{v:.{digits}g}" if isinstance(v, float) else v
                    for k, v in r.items()
                }
            )
