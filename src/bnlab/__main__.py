"""`python -m bnlab ...` is the `bnlab` command."""

import sys

from bnlab.cli import main

sys.exit(main())
