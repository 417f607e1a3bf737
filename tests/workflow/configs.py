"""Test configs for the workflow: the shipped `config/config.yaml` with a cohort's paths and
small per-section settings, so every test runs what a user would, only smaller."""

from __future__ import annotations

from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("features", "splits", "training", "evaluation")


def write_workflow_config(
    path: Path, sheet: Path, outdir: Path, sections: dict | None = None, **top
) -> Path:
    """Write the shipped config to `path` for the cohort `sheet` (its hierarchy.yaml beside
    it) and results in `outdir`; `sections` updates keys inside a section, `top` replaces
    top-level keys."""
    config = yaml.safe_load((PROJECT_ROOT / "config" / "config.yaml").read_text())
    config.update(slides=str(sheet), hierarchy=str(sheet.parent / "hierarchy.yaml"))
    config.update(outdir=str(outdir), deploy=[])  # the demo's deployment cohort is not here
    config.update(**top)
    # features.slides_per_job stays the shipped one (8): the tests plan and run what users do.
    for section, changes in (sections or {}).items():
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r}")
        config[section].update(changes)
    path.write_text(yaml.safe_dump(config))
    return path
