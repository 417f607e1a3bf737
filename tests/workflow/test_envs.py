"""Per-rule conda environments: every rule names one that exists, each env file pins the
same versions as constraints.txt (the versions the tests ran with), and a job whose
environment holds the dependencies but not the project still runs the checkout's code."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.conftest import snakemake_command
from tests.workflow.configs import write_workflow_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RULES = sorted((PROJECT_ROOT / "workflow" / "rules").glob("*.smk"))
ENVS = sorted((PROJECT_ROOT / "envs").glob("*.yaml"))
# A requirement line: name==version (pip) or name=version (conda).
PIN = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(==|=)\s*([A-Za-z0-9_.+\-]+)\s*$")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (PROJECT_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalise(name)] = version
    return pins


def env_pins(path: Path) -> dict[str, str]:
    """name -> version for every pinned package of a conda env file (conda and pip parts)."""
    spec = yaml.safe_load(path.read_text())
    assert set(spec) <= {"name", "channels", "dependencies"}, path
    requirements = []
    for dependency in spec["dependencies"]:
        if isinstance(dependency, dict):
            requirements += dependency["pip"]
        else:
            requirements.append(dependency)
    pins = {}
    for requirement in requirements:
        match = PIN.match(requirement)
        if match:
            pins[normalise(match[1])] = match[3]
        else:
            assert requirement == "pip", f"{path.name}: {requirement!r} is not pinned"
    return pins


def rule_envs() -> dict[str, Path]:
    """rule name -> env file its `conda:` directive points to (relative to the .smk file)."""
    found = {}
    for smk in RULES:
        rule = None
        lines = smk.read_text().splitlines()
        for i, line in enumerate(lines):
            if match := re.match(r"^(?:rule|checkpoint) (\w+):", line):
                rule = match[1]
            elif line.strip() == "conda:" and rule:
                found[rule] = (smk.parent / lines[i + 1].strip().strip("\"'")).resolve()
    return found


def rule_names() -> set[str]:
    return {
        match[1]
        for smk in RULES
        for match in re.finditer(r"^(?:rule|checkpoint) (\w+):", smk.read_text(), re.M)
    }


def test_every_rule_with_a_command_has_an_existing_env():
    envs = rule_envs()
    assert set(envs) == rule_names()
    for rule, env in envs.items():
        assert env.is_file(), f"rule {rule}: {env} does not exist"
        assert env.parent == PROJECT_ROOT / "envs", rule
    assert {env.name for env in envs.values()} == {env.name for env in ENVS}, "unused env file"


@pytest.mark.parametrize("env", ENVS, ids=lambda path: path.name)
def test_env_pins_agree_with_constraints(env):
    pins = constraints()
    spec = env_pins(env)
    assert spec.pop("python") == "3.11"
    assert spec, env
    for name, version in spec.items():
        assert name in pins, f"{env.name}: {name} is not in constraints.txt"
        assert version == pins[name], f"{env.name}: {name}=={version} but {pins[name]} pinned"


def test_envs_hold_what_their_stage_imports():
    """The packages a stage's modules import are in that stage's env."""
    needs = {
        "preprocess.yaml": {"openslide-python", "opencv-python-headless", "h5py", "pandas"},
        "features.yaml": {"torch", "timm", "safetensors", "openslide-python", "h5py"},
        "train.yaml": {"torch", "scikit-learn", "matplotlib", "h5py", "pandas", "tabulate"},
    }
    for env in ENVS:
        assert needs[env.name] <= set(env_pins(env)), env.name


def environment_without_the_project(folder: Path) -> Path:
    """A virtual environment that holds every dependency of this one but not the project, as
    a per-rule conda environment does: its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    source = Path(sysconfig.get_paths()["purelib"])
    target = next(folder.glob("lib/python*/site-packages"))
    for entry in source.iterdir():
        if "hmil" not in entry.name.lower():  # the project's install (editable or not)
            (target / entry.name).symlink_to(entry)
    return folder / "bin"


def test_jobs_import_the_project_from_the_checkout_where_their_environment_lacks_it(
    tmp_path, fixture_slides
):
    bin_dir = environment_without_the_project(tmp_path / "env")
    # the job's `python` is the environment's; Snakemake clears PYTHONPATH in conda jobs
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    check = subprocess.run(
        ["python", "-c", "import hmil"], cwd=tmp_path, env=env, capture_output=True
    )
    assert b"No module named 'hmil'" in check.stderr  # the environment is as conda makes it
    sheet = tmp_path / "slides.csv"
    sheet.write_text(
        "slide_id,path,patient_id,label\n"
        + "".join(f"s{i},{fixture_slides / 'cmu_small_region.svs'},p{i},{i % 6}\n"
                  for i in range(36))
    )  # fmt: skip
    shutil.copy(PROJECT_ROOT / "hmil" / "presets" / "hierarchies" / "panda.yaml",
                tmp_path / "hierarchy.yaml")  # fmt: skip
    config = write_workflow_config(tmp_path / "config.yaml", sheet, tmp_path / "results")
    command = snakemake_command(config, "splits")
    command[command.index("--directory") + 1] = str(tmp_path)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    log = tmp_path / "results" / "logs" / "splits.log"
    assert done.returncode == 0, log.read_text() if log.exists() else done.stderr[-2000:]
    assert (tmp_path / "results" / "splits" / "DATA_SPLIT.csv").exists()
