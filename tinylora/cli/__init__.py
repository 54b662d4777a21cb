"""The `tinylora` command and what only it needs.

    commands.py the argparse front end: one subcommand per library function, errors as one line
    info.py     `tinylora info`: architecture, parameter counts, bytes held per storage type
    demo.py     `tinylora demo`: the quick-start, with its bundled identity data in demo_data/

Nothing in the package imports this one.
"""

from .commands import build_parser, main

__all__ = ["build_parser", "main"]
