"""``python -m ringattn ...``: the ``ringattn`` command."""

import sys

from .cli import main

sys.exit(main())
