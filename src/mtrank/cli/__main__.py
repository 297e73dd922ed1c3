"""``python -m mtrank.cli ...`` (e.g. under ``torchrun``) is ``mtrank ...``."""

import sys

from mtrank.cli import main

if __name__ == "__main__":
    sys.exit(main())
