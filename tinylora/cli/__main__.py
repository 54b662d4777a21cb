"""`python -m tinylora.cli ...`, the same as the `tinylora` command."""

import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main())
