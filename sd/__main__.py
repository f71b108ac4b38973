"""`python -m sd ...`: the same as the `sd` command (sd/cli.py)."""

import sys

from .cli import main

sys.exit(main())
