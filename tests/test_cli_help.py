"""Every command's --help says what each of its options is for (one line per option)."""

import argparse
import importlib

import pytest

COMMANDS = [
    "hmil.compare", "hmil.deploy", "hmil.evaluate", "hmil.heatmaps", "hmil.predict", "hmil.splits",
    "hmil.synthetic_features", "hmil.train", "preprocessing.extract",
    "preprocessing.import_features", "preprocessing.patch", "preprocessing.synthetic",
]  # fmt: skip


class Parsed(Exception):
    """Raised instead of parsing, carrying the parser the command built."""


def parser_of(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    def capture(self, *args, **kwargs):
        raise Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Parsed) as parsed:
        importlib.import_module(module_name).main(["--help"])
    return parsed.value.args[0]


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                missing += undocumented(sub)
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            missing.append(f"{parser.prog}: {'/'.join(action.option_strings) or action.dest}")
    return missing


@pytest.mark.parametrize("module_name", COMMANDS)
def test_every_option_has_a_help_line(module_name, monkeypatch):
    assert undocumented(parser_of(module_name, monkeypatch)) == []
