"""`python -m distad ...` is the `distad` command."""

import sys

from .cli import main

sys.exit(main())
