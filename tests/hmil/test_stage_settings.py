"""The split, evaluation and deployment settings are declared once
(hmil/data/split_settings.py, hmil/evaluation/settings.py): the commands' options and the
workflow's words follow from them, and the workflow's config schema holds the same keys,
types, defaults and bounds, save the differences named here."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from hmil.data.split_settings import SplitSettings
from plumbing.cli import add_options
from plumbing.settings import option_fields, option_words, schema_entry

SCHEMA = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "workflow/schemas/config.schema.yaml").read_text()
)["properties"]


def declared(*settings: type) -> dict[str, dict]:
    """The schema entry each option field of ``settings`` gives, by config key."""
    return {spec.name: schema_entry(spec) for cls in settings for spec in option_fields(cls)}


def schema_section(name: str, *, not_settings: set[str] = frozenset()) -> dict[str, dict]:
    """The schema's entries of a config section, descriptions aside, less ``not_settings``."""
    section = SCHEMA[name]["properties"]
    assert not_settings <= set(section)
    return {
        key: {k: v for k, v in entry.items() if k != "description"}
        for key, entry in section.items()
        if key not in not_settings
    }


def test_the_schema_holds_every_split_setting_as_declared():
    expected = declared(SplitSettings)
    # not in the config: the workflow's repeated protocol keeps the paper's 10 % test share
    del expected["test_fraction"]
    # the workflow's own choices, narrower than the command's: 5 folds unless told (the
    # command needs --folds), at least k-fold's two whatever the protocol, and a
    # validation share under half
    expected["folds"] |= {"minimum": 2, "default": 5}
    expected["val_fraction"]["exclusiveMaximum"] = 0.5
    # from_hmil_pkls is a folder that replaces the settings with the published splits
    assert schema_section("splits", not_settings={"from_hmil_pkls"}) == expected


def test_the_split_section_becomes_the_commands_options_and_parses_back():
    section = {"folds": 3, "seed": 7, "val_fraction": 0.2, "protocol": "kfold",
               "allow_sparse_classes": True, "from_hmil_pkls": None}  # fmt: skip
    words = option_words(section, SplitSettings)
    assert words == [
        "--folds 3", "--seed 7", "--val-fraction 0.2", "--protocol kfold", "--allow-sparse-classes"
    ]  # fmt: skip
    parser = argparse.ArgumentParser()
    add_options(parser, SplitSettings)
    args = vars(parser.parse_args(" ".join(words).split()))
    del section["from_hmil_pkls"]  # an option of its own: not a setting
    assert args == section | {"test_fraction": 0.1}
