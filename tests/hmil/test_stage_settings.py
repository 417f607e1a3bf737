"""The split, evaluation and deployment settings are declared once
(hmil/data/split_settings.py, hmil/evaluation/settings.py): the commands' options and the
workflow's words follow from them, and the workflow's config schema holds the same keys,
types, defaults and bounds, save the differences named here."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from hmil.data.split_settings import SplitSettings
from hmil.evaluation.settings import BootstrapSettings, DeploySettings, HeatmapSettings
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


def test_the_schema_holds_every_evaluation_setting_as_declared():
    expected = declared(BootstrapSettings, HeatmapSettings)
    # the workflow's own choice: no thumbnail under 128 px (the command draws any size)
    expected["heatmap_size"]["minimum"] = 128
    assert schema_section("evaluation") == expected


def test_deployment_takes_the_evaluations_settings_and_its_section_holds_none():
    # the deploy section lists cohorts (a name and a slide sheet: where, not how)
    cohort = SCHEMA["deploy"]["items"]["properties"]
    assert set(cohort) == {"name", "slides"}
    # its rule passes the evaluation section's bootstrap; the device is not in the config
    # (the deploy jobs ask for no GPU), so the command's default, cpu, holds
    expected = declared(DeploySettings)
    assert expected.pop("device") == {"type": "string", "enum": ["cpu", "cuda"], "default": "cpu"}
    assert expected == declared(BootstrapSettings)
    evaluation = {"bootstrap": 50, "seed": 3, "heatmap_top_k": 8, "heatmap_size": 640}
    assert option_words(evaluation, DeploySettings) == ["--bootstrap 50", "--seed 3"]


def test_the_evaluation_section_becomes_each_commands_options_and_parses_back():
    evaluation = {"bootstrap": 50, "seed": 3, "heatmap_top_k": 8, "heatmap_size": 640}
    words = option_words(evaluation, BootstrapSettings) + option_words(evaluation, HeatmapSettings)
    assert words == ["--bootstrap 50", "--seed 3", "--top-k 8", "--thumbnail-size 640"]
    parser = argparse.ArgumentParser()
    add_options(parser, BootstrapSettings)
    add_options(parser, HeatmapSettings)
    assert vars(parser.parse_args(" ".join(words).split())) == evaluation
