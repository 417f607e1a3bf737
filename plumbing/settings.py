"""Settings declared once as dataclass fields: the option of a command and the key of the
workflow config it comes from are the field's name, its help and how the command line
reads it the field's metadata (:func:`option`). A stage's settings class then gives its
command's options (:func:`plumbing.cli.add_options`) and the words a workflow rule passes
(:func:`option_words`). Standard library only: the workflow reads these classes when it
plans its jobs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


class BadValue(ValueError):
    """A value a setting refuses; the command line shows its message as the usage error."""


def non_negative(value: str) -> int:
    """A count that may be 0 (e.g. bootstrap resamples: 0 means none)."""
    try:
        number = int(value)
    except ValueError:
        raise BadValue(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise BadValue(f"must be ≥ 0, got {number}")
    return number


def non_negative_float(value: str) -> float:
    """A size that may be 0 (e.g. a memory budget in GiB: 0 means none)."""
    try:
        number = float(value)
    except ValueError:
        raise BadValue(f"expected a number, got {value!r}") from None
    if not number >= 0:  # NaN too
        raise BadValue(f"must be ≥ 0, got {value}")
    return number


def option(
    help: str,
    *,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    choices: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Metadata of a field that is a command-line option: its help line, its flag (default
    ``--`` and the name with dashes), how the command line reads it, its choices."""
    return {"help": help, "flag": flag, "parse": parse, "choices": choices}


def option_fields(settings: type) -> list[dataclasses.Field]:
    """The fields of ``settings`` that are options, in their order."""
    return [f for f in dataclasses.fields(settings) if "help" in f.metadata]


def flag_of(spec: dataclasses.Field) -> str:
    return spec.metadata["flag"] or "--" + spec.name.replace("_", "-")


def option_words(section: Mapping[str, Any], settings: type) -> list[str]:
    """``--flag value`` for each option field of ``settings`` that the workflow config's
    ``section`` gives (None or absent: left to the command's default), in field order."""
    return [
        f"{flag_of(spec)} {section[spec.name]}"
        for spec in option_fields(settings)
        if section.get(spec.name) is not None
    ]
