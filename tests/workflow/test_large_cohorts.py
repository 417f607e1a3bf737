"""What a cohort of thousands of slides needs from every rule: no job's command grows with
the number of slides. A program's arguments pass through exec, whose limit (ARG_MAX: 2 MiB
with the environment on Linux) a list of every slide's file reaches at PANDA's size with two
encoders and long paths."""

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd

from tests.conftest import PROJECT_ROOT, snakemake_command
from tests.workflow.configs import write_workflow_config

PANDA = PROJECT_ROOT / "hmil" / "presets" / "hierarchies" / "panda.yaml"


def plan_commands(folder: Path, slide: Path, num_slides: int) -> dict[str, int]:
    """rule → length of its longest shell command in a dry run of ``num_slides`` slides
    (every path the same real slide; two encoders, the shipped models and shard size)."""
    folder.mkdir()
    sheet = folder / "slides.csv"
    pd.DataFrame(
        {
            "slide_id": [f"slide_{i:05d}" for i in range(num_slides)],
            "path": [str(slide)] * num_slides,
            "patient_id": [f"patient_{i // 2:05d}" for i in range(num_slides)],
            "label": [str(i % 6) for i in range(num_slides)],
        }
    ).to_csv(sheet, index=False)
    shutil.copy(PANDA, folder / "hierarchy.yaml")
    config = write_workflow_config(
        folder / "config.yaml", sheet, folder / "results",
        {"features": {"weights": {"uni": "random", "resnet50_trunc": "random"}}},
        encoders=["uni", "resnet50_trunc"],
    )  # fmt: skip
    command = snakemake_command(config, "--dry-run", "--printshellcmds")
    command[command.index("--directory") + 1] = str(folder)
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    longest: dict[str, int] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", done.stdout):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        if rule and shell:
            longest[rule[1]] = max(longest.get(rule[1], 0), len(shell[1]))
    return longest


def test_no_rule_command_grows_with_the_cohort(tmp_path, fixture_slides):
    slide = fixture_slides / "cmu_small_region.svs"
    small = plan_commands(tmp_path / "small", slide, 12)
    large = plan_commands(tmp_path / "large", slide, 240)
    assert {"patch", "extract_features", "train", "evaluate"} <= set(large)
    grown = {rule: (small.get(rule), length) for rule, length in large.items()
             if length > small.get(rule, 0) + 16}  # fmt: skip
    assert not grown, f"commands that grow with the cohort (12 → 240 slides): {grown}"
