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


@dataclasses.dataclass(frozen=True)
class Bounded:
    """A number read from text and checked against its bounds (``minimum``/``maximum``
    inclusive, ``above``/``below`` exclusive). The bounds are data, not code, so that the
    workflow's config schema can be held equal to them (:func:`schema_entry`)."""

    kind: type  # int or float
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None

    def __call__(self, value: str) -> int | float:
        try:
            number = self.kind(value)
        except ValueError:
            expected = "a whole number" if self.kind is int else "a number"
            raise BadValue(f"expected {expected}, got {value!r}") from None
        for bound, holds, sign in (  # written as what holds, so that NaN holds none
            (self.minimum, lambda b: number >= b, "≥"),
            (self.above, lambda b: number > b, ">"),
            (self.maximum, lambda b: number <= b, "≤"),
            (self.below, lambda b: number < b, "<"),
        ):
            if bound is not None and not holds(bound):
                raise BadValue(f"must be {sign} {bound}, got {number}")
        return number

    def schema(self) -> dict[str, Any]:
        """The bounds as JSON-schema keywords."""
        keywords = {"minimum": self.minimum, "maximum": self.maximum,
                    "exclusiveMinimum": self.above, "exclusiveMaximum": self.below}  # fmt: skip
        return {key: bound for key, bound in keywords.items() if bound is not None}


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


def is_switch(spec: dataclasses.Field) -> bool:
    """A yes/no field: its option is a bare flag, off unless given."""
    return spec.type in ("bool", bool)


#: JSON-schema type of each field type a setting may have.
SCHEMA_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}


def schema_entry(spec: dataclasses.Field) -> dict[str, Any]:
    """The workflow config schema's entry of the option field ``spec``: its type, default
    (None: the command's own, so none), choices and :class:`Bounded` bounds."""
    kind = (spec.type if isinstance(spec.type, str) else spec.type.__name__).removesuffix(" | None")
    entry: dict[str, Any] = {"type": SCHEMA_TYPES[kind]}
    if spec.metadata["choices"] is not None:
        entry["enum"] = list(spec.metadata["choices"])
    if isinstance(spec.metadata["parse"], Bounded):
        entry.update(spec.metadata["parse"].schema())
    if spec.default is not None and spec.default is not dataclasses.MISSING:
        entry["default"] = spec.default
    return entry


def option_words(section: Mapping[str, Any], settings: type) -> list[str]:
    """``--flag value`` for each option field of ``settings`` that the workflow config's
    ``section`` gives (None or absent: left to the command's default), in field order; a
    yes/no field is its bare flag when the section says yes, nothing otherwise."""
    words = []
    for spec in option_fields(settings):
        value = section.get(spec.name)
        if is_switch(spec):
            words += [flag_of(spec)] if value else []
        elif value is not None:
            words.append(f"{flag_of(spec)} {value}")
    return words
