"""How a setting declared once (plumbing/settings.py) becomes an option, its bounds, a
workflow rule's words and a schema entry."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from plumbing.cli import add_options
from plumbing.settings import BadValue, Bounded, option, option_fields, option_words, schema_entry


@dataclass(frozen=True)
class Example:
    count: int = field(default=3, metadata=option("how many", parse=Bounded(int, minimum=1)))
    share: float = field(
        default=0.5, metadata=option("a share", parse=Bounded(float, above=0, below=1))
    )
    mode: str = field(default="a", metadata=option("which", choices=("a", "b")))
    loud: bool = field(default=False, metadata=option("say more"))
    level: int | None = field(default=None, metadata=option("left to the command", parse=int))
    internal: int = 7  # no option


def test_bounds_refuse_out_of_range_text_in_one_line():
    count = Bounded(int, minimum=1)
    assert count("2") == 2
    with pytest.raises(BadValue, match="must be ≥ 1, got 0"):
        count("0")
    with pytest.raises(BadValue, match="expected a whole number, got 'x'"):
        count("x")
    share = Bounded(float, above=0, below=1)
    with pytest.raises(BadValue, match=r"must be > 0, got 0\.0"):
        share("0")
    with pytest.raises(BadValue, match=r"must be < 1, got 1\.0"):
        share("1")
    assert Bounded(float, minimum=0, maximum=1)("1") == 1.0
    with pytest.raises(BadValue, match="must be ≥ 0, got nan"):
        Bounded(float, minimum=0)("nan")


def test_a_switch_is_a_bare_flag_on_the_command_line_and_in_a_rules_words():
    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    assert parser.parse_args([]).loud is False
    assert parser.parse_args(["--loud"]).loud is True
    section = {"count": 2, "share": 0.25, "mode": "b", "loud": True, "internal": 1}
    words = option_words(section, Example)
    assert words == ["--count 2", "--share 0.25", "--mode b", "--loud"]
    args = parser.parse_args(" ".join(words).split())
    assert (args.count, args.share, args.mode, args.loud) == (2, 0.25, "b", True)
    assert option_words({"loud": False}, Example) == []


def test_a_bound_broken_on_the_command_line_is_a_usage_error(capsys):
    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    with pytest.raises(SystemExit):
        parser.parse_args(["--share", "1"])
    assert "argument --share: must be < 1, got 1.0" in capsys.readouterr().err


def test_the_schema_entry_of_a_setting_is_its_type_default_bounds_and_choices():
    entries = {spec.name: schema_entry(spec) for spec in option_fields(Example)}
    assert entries == {
        "count": {"type": "integer", "minimum": 1, "default": 3},
        "share": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.5},
        "mode": {"type": "string", "enum": ["a", "b"], "default": "a"},
        "loud": {"type": "boolean", "default": False},
        "level": {"type": "integer"},
    }
