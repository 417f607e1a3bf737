"""The patching and extraction settings are declared once (preprocessing/slides/params.py,
preprocessing/features/settings.py): the commands' options and the workflow's arguments
follow from them, and the workflow's config schema holds the same keys and defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from plumbing.cli import add_options
from plumbing.settings import option_fields, option_words
from preprocessing.features.settings import ExtractSettings
from preprocessing.slides.params import PatchParams, TissueParams

SCHEMA = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "workflow/schemas/config.schema.yaml").read_text()
)["properties"]


def test_the_schema_holds_every_patching_setting_with_its_default():
    section = SCHEMA["preprocessing"]["properties"]
    declared = {f.name: f.default for c in (PatchParams, TissueParams) for f in option_fields(c)}
    assert set(section) == set(declared)
    schema_defaults = {key: entry["default"] for key, entry in section.items()}
    assert schema_defaults == declared | {"threshold": "otsu"}  # the config's word for None


def test_the_schema_holds_every_extraction_setting_with_its_default():
    section = SCHEMA["features"]["properties"]
    declared = {f.name: f.default for f in option_fields(ExtractSettings)}
    del declared["on_bad_patch"]  # the workflow's strict mode chooses it
    assert set(declared) <= set(section)
    schema_defaults = {key: section[key]["default"] for key in declared}
    # the workflow stores float16 and reads with 4 processes; the command, alone, float32
    # and as many as its device suits
    assert schema_defaults == declared | {"workers": 4, "dtype": "float16"}


def test_a_config_section_becomes_the_commands_options_and_parses_back():
    section = {"target_mpp": 0.25, "threshold": 40, "min_tissue_area_um2": 5.0, "other": 1}
    words = option_words(section, PatchParams) + option_words(section, TissueParams)
    assert words == ["--target-mpp 0.25", "--threshold 40", "--min-tissue-area 5.0"]
    parser = argparse.ArgumentParser()
    add_options(parser, PatchParams)
    add_options(parser, TissueParams)
    args = parser.parse_args(" ".join(words).split())
    assert (args.target_mpp, args.threshold, args.min_tissue_area_um2) == (0.25, 40, 5.0)
    assert args.min_hole_area_um2 == TissueParams().min_hole_area_um2
