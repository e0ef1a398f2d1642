"""fnnet's research experiments: reproducible studies with figures, CSV and write-ups.

Run every study with ``python -m experiments`` (``--quick`` for a smoke run);
see experiments/README.md.
"""
