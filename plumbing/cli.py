"""Shared command-line plumbing: logging set-up and turning expected errors into one line."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from plumbing.errors import PipelineError
from plumbing.settings import BadValue, flag_of, is_switch, option_fields

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


def file_list_parser(prog: str, description: str, files: str, what: str) -> argparse.ArgumentParser:
    """A command's parser whose positional ``files`` takes many paths, also as ``@FILE`` (one
    per line): a cohort's list outgrows what one command line may hold."""
    parser = argparse.ArgumentParser(prog=prog, description=description, fromfile_prefix_chars="@")
    parser.add_argument(
        files, nargs="+", type=Path, help=f"{what} (@FILE: the paths in FILE, one per line)"
    )
    return parser


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its :class:`~plumbing.settings.BadValue` message
    becomes the usage error; another ValueError gives argparse's own ("invalid <name>
    value")."""

    @functools.wraps(parse)
    def parse_option(text: str) -> Any:
        try:
            return parse(text)
        except BadValue as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse_option


def add_options(parser: Any, settings: type) -> None:
    """An option per option field of the dataclass ``settings`` (:mod:`plumbing.settings`),
    its default the field's; parsed under the field's name. A yes/no field is a bare flag
    (store_true), so it defaults to False."""
    for spec in option_fields(settings):
        meta = spec.metadata
        kwargs: dict[str, Any] = {"help": meta["help"]}
        if is_switch(spec):
            if spec.default is not False:
                raise TypeError(f"{spec.name}: a yes/no option is off unless given")
            kwargs["action"] = "store_true"
        elif spec.default is not dataclasses.MISSING:
            kwargs["default"] = spec.default
        if meta["parse"] in (int, float):
            kwargs["type"] = meta["parse"]
        elif meta["parse"] is not None:
            kwargs["type"] = argparse_type(meta["parse"])
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        flag = flag_of(spec)
        if flag != "--" + spec.name.replace("_", "-"):
            kwargs["dest"] = spec.name
            if meta["choices"] is None and not is_switch(spec):
                kwargs["metavar"] = flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(flag, **kwargs)


def option_values(settings: type, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed value of each option field of ``settings``, by field name."""
    return {spec.name: getattr(args, spec.name) for spec in option_fields(settings)}


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
