"""Shared command-line plumbing: logging set-up and turning expected errors into one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from preprocessing.errors import PipelineError

log = logging.getLogger("hmil")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run `main`; expected errors become `error: <message>` and exit code 1, without traceback.

    Unexpected exceptions keep their traceback: they are bugs to report, not bad input.
    """
    try:
        code = main(argv)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
