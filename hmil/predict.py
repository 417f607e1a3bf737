"""Deprecated alias of ``python -m hmil.deploy``, kept for one release: same options, same
outputs, and one note on stderr saying to use the new name.

    python -m hmil.predict RUN_DIR ... --slides SHEET --features DIR --out DIR
"""

from __future__ import annotations

import sys

from hmil.deploy import build_parser, main
from plumbing.cli import run_cli

__all__ = ["build_parser", "main"]

DEPRECATION = (
    "note: `python -m hmil.predict` is deprecated and goes in the next release; "
    "use `python -m hmil.deploy` (the same options)"
)

if __name__ == "__main__":
    print(DEPRECATION, file=sys.stderr)
    run_cli(main)
