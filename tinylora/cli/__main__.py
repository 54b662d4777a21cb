"""`python -m tinylora.cli ...`, the same as the `tinylora` command."""

import sys

from .commands import main

sys.exit(main())
