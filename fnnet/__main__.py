"""``python -m fnnet train ...``: the same as the ``fnnet`` command."""

import sys

from fnnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
