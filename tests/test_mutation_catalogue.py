"""The mutation study's catalogue still matches the source it mutates.

``python -m experiments --only mutation`` plants each catalogued bug in a
copy of fnnet and checks that the tests catch it. A pattern that no longer
occurs exactly once (the code moved) would make that study fail late; this
cheap check (no JAX, no copies) fails as soon as the code moves.
"""

from experiments import mutation


def test_every_mutant_matches_its_file_exactly_once():
    mutation.check_catalogue()
    assert len(mutation.CATALOGUE) >= 40
