"""Regenerate every study: ``python -m experiments [--quick] [--only ...] [--out DIR]``.

Studies run in order (gradient, speed, regularization, results, dp) with a tqdm
progress bar on stderr; each writes its CSV, PNG and markdown under --out
(default experiments/results). ``--quick`` runs a reduced version in well
under a minute and, unless --out is given, writes to a fresh temporary folder
so that the committed results are never overwritten by a smoke run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

STUDIES = ("gradient", "speed", "regularization", "results", "dp")
#: Run only when named with --only (slow, and not a study of fnnet's numbers).
EXTRA_STUDIES = ("mutation",)
RESULTS = Path(__file__).resolve().parent / "results"


def progress_factory(enabled: bool):
    """progress(iterable, desc) -> iterable with a tqdm bar on stderr (if installed)."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an optional dependency
        tqdm = None

    def progress(iterable, desc):
        if tqdm is None or not enabled:
            return iterable
        return tqdm(iterable, desc=desc, file=sys.stderr, leave=False, mininterval=1)

    return progress


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    p.add_argument("--quick", action="store_true", help="reduced version (< 1 min)")
    p.add_argument(
        "--only",
        default=",".join(STUDIES),
        help=f"comma list of studies to run, from {','.join(STUDIES)} (and "
        f"{','.join(EXTRA_STUDIES)}: the mutation check, only when named)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default experiments/results; with --quick a new "
        "temporary folder)",
    )
    p.add_argument(
        "--update-readme",
        action="store_true",
        help="rewrite the results-table block of README.md (results study)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # --tiny: --quick with each study's TINY overrides, the test suite's smoke
    # run (same files and code paths, numbers too small to mean anything).
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.quick = args.quick or args.tiny
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(STUDIES) - set(EXTRA_STUDIES))
    if unknown:
        p.error(
            f"unknown study {unknown}; choose from {', '.join(STUDIES + EXTRA_STUDIES)}"
        )
    if args.out is not None:
        out = Path(args.out)
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="fnnet-experiments-quick-"))
    else:
        out = RESULTS
    out.mkdir(parents=True, exist_ok=True)

    if args.quick:  # small programs: compiling them dominates, so compile less
        import jax

        jax.config.update("jax_disable_most_optimizations", True)
    import matplotlib

    matplotlib.use("Agg")
    from experiments import (
        dp_study,
        gradient_study,
        mutation,
        regularization_study,
        results_table,
        speed_study,
    )

    modules = {
        "gradient": gradient_study,
        "speed": speed_study,
        "regularization": regularization_study,
        "results": results_table,
        "dp": dp_study,
        "mutation": mutation,
    }
    if args.tiny:
        for module in modules.values():
            if hasattr(module, "TINY"):
                module.QUICK = {**module.QUICK, **module.TINY}
    progress = progress_factory(not args.no_progress)
    headlines, start = [], time.perf_counter()
    for name in progress([s for s in STUDIES + EXTRA_STUDIES if s in only], "studies"):
        t0 = time.perf_counter()
        kwargs = {"update_readme": args.update_readme} if name == "results" else {}
        lines = modules[name].run(out, args.quick, progress, **kwargs)
        headlines += [f"{line} [{time.perf_counter() - t0:.0f} s]" for line in lines]
    print(f"experiments: wrote {out} in {time.perf_counter() - start:.0f} s")
    for line in headlines:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
