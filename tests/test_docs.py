"""The docs and the code agree on docs/derivation.md's equations and anchors.

Pure text scanning, no JAX. Every ``.py`` and ``.md`` file under fnnet/,
experiments/ (not experiments/results/), tests/ and docs/, plus README.md, is
scanned for

* citations of equations, ``eq. N``, ``eqs. N-M`` / ``eqs. N–M`` (ranges),
  ``eqs. N, M`` / ``eqs. N and M`` (lists), in any letter case: each number
  must be defined in docs/derivation.md by an ``<a id="eq-N"></a>`` anchor;
* links into the derivation (the page's file name, then ``#`` and an anchor
  name) and further anchor names cited in the same paragraph, as in
  ``docs/derivation.md#forward, #blocks``: each must be an anchor of
  docs/derivation.md (an explicit ``<a id>`` or a heading's GitHub-style slug);
* references to documents that are not part of the repository (the patterns
  are built by concatenation below, so that this file does not match them).

The checkers are plain functions of text; the tests at the end feed them bad
input to show that each check can fail.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = "docs/derivation.md"
SCANNED_DIRS = ("fnnet", "experiments", "tests", "docs")
EXCLUDED_PREFIXES = (("experiments", "results"),)

# Numbers fixed by the code that cites them, and the section anchors.
EQUATIONS = range(1, 29)
SECTIONS = (
    "notation",
    "forward",
    "delta-recursion",
    "matrix-form",
    "output-deltas",
    "losses",
    "activations",
    "blocks",
    "regularization",
    "dropout",
    "training",
    "verification",
    "computational-graph",
    "worked-examples",
    "per-example",
)

_ID_RE = re.compile(r"""<a\s+(?:id|name)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
_EQ_ID_RE = re.compile(r"^eq-(\d+)$")
_HEADING_RE = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})")

# eq. 5 | eqs. 9-14 | eqs. 9–14 | eqs. 10, 13 | eqs. 5 and 6 | eq. (8)
_NUM = r"\(?\d+\)?"
_SEP = r"(?:\s*[-–]\s*|\s*,\s*(?:and\s+)?|\s+and\s+|\s+or\s+)"
_EQ_CITE_RE = re.compile(
    r"(?<![\w.])eqs?\.\s*" + _NUM + r"(?:" + _SEP + _NUM + r")*", re.IGNORECASE
)
_RANGE_RE = re.compile(r"(\d+)\)?\s*[-–]\s*\(?(\d+)")
_DOC_LINK_RE = re.compile(r"derivation\.md(#[\w-]*)?", re.IGNORECASE)
# "#anchor" not inside a word, a markdown link to this page ("](#x)"), an
# HTML entity or a heading marker.
_BARE_ANCHOR_RE = re.compile(r"(?<![\w&#/(])#([A-Za-z][\w-]*)")
_LOCAL_LINK_RE = re.compile(r"\]\(#([^)\s]+)\)")

# References to documents outside the repository. Built by concatenation so
# that this file's own source does not match them.
OUTSIDE_PATTERNS = (
    re.compile(r"\bseed" + r" 00\d", re.IGNORECASE),
    re.compile(r"\bDERIV" + r"ATION\b"),  # upper case only: docs/derivation.md is ours
    re.compile(r"\bthe" + r" notes\b", re.IGNORECASE),
    re.compile(r"\blecture" + r" notes\b", re.IGNORECASE),
    re.compile(re.escape(".." + "/shared")),
    re.compile(r"\bAlgorithm" + r" 1\b", re.IGNORECASE),
)


# --------------------------------------------------------------- parsing


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading (before de-duplication)."""
    text = re.sub(r"<[^>]*>", "", heading)  # inline HTML
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # keeps letters, digits, _, -, space
    return text.replace(" ", "-")


def _outside_fences(text: str):
    """(line number, line) of every line that is not inside a fenced block."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE_RE.match(line)
        if m:
            marker = m.group(1)
            if fence is None:
                fence = marker[0] * len(marker)
            elif marker.startswith(fence):
                fence = None
            continue
        if fence is None:
            yield number, line


def anchors(markdown: str) -> set[str]:
    """Explicit ``<a id>`` anchors and heading slugs (de-duplicated as GitHub does)."""
    found = set(_ID_RE.findall(markdown))
    counts: dict[str, int] = {}
    for _, line in _outside_fences(markdown):
        m = _HEADING_RE.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def defined_equations(markdown: str) -> list[int]:
    """Equation numbers with an ``eq-N`` anchor, in order (repeats kept)."""
    return [
        int(m.group(1))
        for anchor in _ID_RE.findall(markdown)
        if (m := _EQ_ID_RE.match(anchor))
    ]


def cited_numbers(citation: str) -> list[int]:
    """Every equation number a citation names: ranges are expanded."""
    body = re.sub(r"^eqs?\.\s*", "", citation, flags=re.IGNORECASE)
    numbers: list[int] = []
    for part in re.split(r"\s*,\s*(?:and\s+)?|\s+and\s+|\s+or\s+", body):
        r = _RANGE_RE.search(part)
        if r:
            lo, hi = int(r.group(1)), int(r.group(2))
            if hi < lo or hi - lo > 50:
                numbers.append(-1)  # a malformed range is reported as undefined
            else:
                numbers.extend(range(lo, hi + 1))
        else:
            numbers.extend(int(n) for n in re.findall(r"\d+", part))
    return numbers


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _paragraph_end(text: str, start: int) -> int:
    """End of the paragraph (or docstring, or 400 characters) from ``start``."""
    ends = [len(text), start + 400]
    for stop in ("\n\n", "\n#\n", '"""', "'''"):
        i = text.find(stop, start)
        if i >= 0:
            ends.append(i)
    return min(ends)


def citation_errors(name: str, text: str, eqs: set[int], doc_anchors: set[str]):
    """``file:line: message`` for every citation of an undefined equation or anchor."""
    errors = []
    for m in _EQ_CITE_RE.finditer(text):
        missing = sorted({n for n in cited_numbers(m.group(0)) if n not in eqs})
        if missing:
            bad = ", ".join("malformed range" if n < 0 else str(n) for n in missing)
            errors.append(
                f"{name}:{_line_of(text, m.start())}: {m.group(0)!r} cites "
                f"equation(s) {bad}, not defined in {DOC}"
            )
    for m in _DOC_LINK_RE.finditer(text):
        cited = []
        if m.group(1) is not None:
            cited.append((m.start(1), m.group(1)[1:]))
        end = _paragraph_end(text, m.end())
        for b in _BARE_ANCHOR_RE.finditer(text, m.end(), end):
            cited.append((b.start(), b.group(1)))
        for offset, anchor in cited:
            if anchor not in doc_anchors:
                errors.append(
                    f"{name}:{_line_of(text, offset)}: anchor #{anchor} is not "
                    f"defined in {DOC}"
                )
    return sorted(set(errors), key=_error_order)


def outside_reference_errors(name: str, text: str):
    """``file:line: text`` for every reference to a document outside the repo."""
    errors = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern in OUTSIDE_PATTERNS:
            for m in pattern.finditer(line):
                errors.append(
                    f"{name}:{number}: {m.group(0)!r} refers to a document outside "
                    f"the repository: {line.strip()}"
                )
    return errors


def local_link_errors(name: str, markdown: str):
    """``file:line`` for every ``[text](#anchor)`` whose anchor the file lacks."""
    own = anchors(markdown)
    return [
        f"{name}:{number}: link to #{m.group(1)}, which is not an anchor of {name}"
        for number, line in _outside_fences(markdown)
        for m in _LOCAL_LINK_RE.finditer(line)
        if m.group(1) not in own
    ]


def _error_order(error: str):
    name, line, _ = error.split(":", 2)
    return name, int(line), error


# ----------------------------------------------------------------- corpus


def scanned_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for directory in SCANNED_DIRS:
        for path in sorted((ROOT / directory).rglob("*")):
            rel = path.relative_to(ROOT).parts
            if (
                path.is_file()
                and path.suffix in (".py", ".md")
                and "__pycache__" not in rel
                and not any(rel[: len(p)] == p for p in EXCLUDED_PREFIXES)
            ):
                files.append(path)
    return files


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _doc() -> str:
    return _read(ROOT / DOC)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _report(errors: list[str]) -> str:
    return f"{len(errors)} problem(s):\n" + "\n".join(errors)


# ------------------------------------------------------------------ tests


def test_derivation_defines_every_equation_once():
    numbers = defined_equations(_doc())
    assert sorted(numbers) == list(EQUATIONS), (
        f"{DOC} must define eq-1 .. eq-{EQUATIONS[-1]} exactly once each; "
        f"found {numbers}"
    )


def test_derivation_has_the_section_anchors():
    explicit = set(_ID_RE.findall(_doc()))
    missing = [s for s in SECTIONS if s not in explicit]
    assert not missing, f"{DOC} lacks the section anchors {missing}"


def test_every_citation_names_a_defined_equation_or_anchor():
    doc = _doc()
    eqs, doc_anchors = set(defined_equations(doc)), anchors(doc)
    errors = []
    for path in scanned_files():
        errors += citation_errors(_rel(path), _read(path), eqs, doc_anchors)
    assert not errors, _report(errors)


def test_no_references_to_documents_outside_the_repository():
    errors = []
    for path in scanned_files():
        errors += outside_reference_errors(_rel(path), _read(path))
    assert not errors, _report(errors)


def test_readme_links_to_the_derivation():
    readme = _read(ROOT / "README.md")
    assert re.search(r"\]\((?:\./)?" + re.escape(DOC) + r"(?:#[\w-]+)?\)", readme), (
        f"README.md must link to {DOC}, e.g. [the derivation]({DOC})"
    )


def test_in_page_links_resolve():
    errors = []
    for path in (ROOT / "README.md", ROOT / DOC):
        errors += local_link_errors(_rel(path), _read(path))
    assert not errors, _report(errors)


# ------------------------------------------- the checks themselves can fail

_EQ, _EQS = "eq" + ".", "eqs" + "."
_FAKE_DOC = (
    '<a id="notation"></a>\n## Notation\n\n'
    '<a id="eq-1"></a>\n\n```\na = W z + b    (1)\n```\n\n'
    '<a id="eq-2"></a>\n\n```\nz = h(a)    (2)\n```\n\n'
    "## The block view\n\n```\n# not a heading\n```\n"
)


def _fake_errors(text: str, name: str = "fake.py") -> list[str]:
    eqs, doc_anchors = set(defined_equations(_FAKE_DOC)), anchors(_FAKE_DOC)
    return citation_errors(name, text, eqs, doc_anchors)


def test_parsing_of_the_fake_doc():
    assert defined_equations(_FAKE_DOC) == [1, 2]
    assert anchors(_FAKE_DOC) == {"notation", "eq-1", "eq-2", "the-block-view"}
    assert github_slug("The computational graph (`fnnet.graph`)") == (
        "the-computational-graph-fnnetgraph"
    )


def test_citation_forms_are_parsed():
    assert cited_numbers(f"{_EQS} 9-14") == list(range(9, 15))
    assert cited_numbers(f"{_EQS} 12–14") == [12, 13, 14]
    assert cited_numbers(f"{_EQS} 10, 13") == [10, 13]
    assert cited_numbers(f"{_EQS} 5 and 6") == [5, 6]
    assert cited_numbers(f"{_EQS} 5-7, 9 and 11") == [5, 6, 7, 9, 11]
    assert cited_numbers(f"{_EQ} (8)") == [8]
    assert cited_numbers(f"{_EQS} 7-5") == [-1]


def test_good_citations_pass():
    text = (
        f"x = 1  # {_EQ} 1\n{_EQS} 1-2, {_EQS} 1 and 2, {_EQS} 1, 2, "
        f"{_EQ.upper()} 2\nsee docs/derivation{'.md'}#notation, #the-block-view\n"
        "\nin the next paragraph a colour is no anchor: '#ff00aa'\n"
    )
    assert _fake_errors(text) == []


def test_undefined_equation_numbers_fail_with_file_and_line():
    text = f"ok {_EQ} 1\n# {_EQ} 3\n{_EQS} 1-4\n{_EQS} 2, 9\n{_EQS} 1 and 7\n"
    errors = _fake_errors(text, "pkg/mod.py")
    assert [e.split(":")[:2] for e in errors] == [
        ["pkg/mod.py", str(n)] for n in (2, 3, 4, 5)
    ]
    assert "equation(s) 3," in errors[0] and "3, 4" in errors[1]
    assert "9" in errors[2] and "7" in errors[3]


def test_undefined_anchors_fail():
    md = "derivation" + ".md"
    text = (
        f"[x](docs/{md}#notation)\n[y](docs/{md}#nowhere)\n"
        f"see docs/{md}#notation and #elsewhere\n"
        f"(docs/{md}, #missing-too)\n"
    )
    errors = _fake_errors(text, "README.md")
    assert [e.split(":")[1] for e in errors] == ["2", "3", "4"]
    assert "#nowhere" in errors[0] and "#elsewhere" in errors[1]
    assert "#missing-too" in errors[2]


def test_outside_references_fail():
    bad = [
        "see " + "seed" + " 003's graph",
        "Seed" + " 001 writes",
        "DERIV" + "ATION.md, eq. 2",
        "(DERIV" + "ATION, 'Activations')",
        "as in " + "the" + " notes",
        "The" + " Notes say",
        "the " + "lecture" + " notes' claims",
        "cat .." + "/shared/x",
        "runs " + "Algorithm" + " 1 (outer products)",
    ]
    for line in bad:
        assert outside_reference_errors("f.md", line), line
    good = "docs/derivation" + ".md eq. 2; seed 0; seeds 0-4; notes = []; Algorithm 12"
    assert outside_reference_errors("f.md", good) == []


def test_broken_in_page_links_fail():
    md = "# Title\n\n## The computational graph\n\n[a](#title) [b](#the-graph)\n"
    errors = local_link_errors("README.md", md)
    assert len(errors) == 1 and "#the-graph" in errors[0]
    assert errors[0].startswith("README.md:5:")
