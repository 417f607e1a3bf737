"""Shared command-line plumbing: logging set-up and turning expected errors into one line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from plumbing.errors import PipelineError

log = logging.getLogger("hmil")

Config = TypeVar("Config")


def config_from_args(config_type: type[Config], args: argparse.Namespace, **values: Any) -> Config:
    """The typed configuration of a command, built once from its parsed options.

    Each field takes the option of the same name; ``values`` gives the fields whose option
    is named or shaped otherwise. A field with neither is a bug (AttributeError), never a
    silent default.
    """
    names = [field.name for field in dataclasses.fields(config_type) if field.name not in values]
    return config_type(**{name: getattr(args, name) for name in names}, **values)


def non_negative_int(value: str) -> int:
    """argparse type of a count that may be 0 (e.g. bootstrap resamples: 0 means none)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {number}")
    return number


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
