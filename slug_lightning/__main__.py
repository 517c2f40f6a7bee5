"""``python -m slug_lightning``: see :mod:`slug_lightning.cli`."""

import sys

from slug_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main())
