"""``python -m mtrank.cli ...`` (e.g. under ``torchrun``) is ``mtrank ...``."""

import sys

from mtrank.cli import main

sys.exit(main())
