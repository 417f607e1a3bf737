"""The package installs anywhere: a wheel built from the checkout, installed (not editable)
into a fresh virtual environment, trains from another folder with its shipped presets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import numpy as np
import pytest

from hmil.data.hierarchy import Hierarchy
from hmil.data.synthetic import SyntheticConfig, generate_cohort, write_cohort

ROOT = Path(__file__).resolve().parents[1]
#: What the wheel is built from: the packages and the files pyproject.toml names.
WHEEL_SOURCES = ("hmil", "plumbing", "preprocessing", "pyproject.toml", "README.md", "LICENSE")


def run(command: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run without PYTHONPATH, so nothing of a checkout is importable by accident."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{command[:4]} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The python of a fresh venv that holds the wheel and sees this environment's
    dependencies (torch, ...) through a .pth line. A directory added by a .pth line has its
    own .pth files ignored, so an editable install of any checkout stays invisible."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"  # a clean copy: no stale build/ of the checkout in the wheel
    for name in WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    wheels = work / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", wheels, source], cwd=work)  # fmt: skip
    (wheel,) = wheels.glob("hmil_pipeline-*.whl")
    environment = work / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         wheel], cwd=work)  # fmt: skip
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work)
    ours = sysconfig.get_paths()
    dependencies = dict.fromkeys((ours["purelib"], ours["platlib"]))
    (Path(site.stdout.strip()) / "dependencies.pth").write_text("\n".join(dependencies) + "\n")
    return python


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Path:
    """A folder that is neither the checkout nor holds a copy of it."""
    return tmp_path_factory.mktemp("elsewhere")


def test_the_wheel_is_what_python_imports_and_it_finds_its_presets(installed, elsewhere):
    probe = (
        "import json, hmil, plumbing, preprocessing\n"
        "from hmil.data.hierarchy import Hierarchy\n"
        "from hmil.models.mhim_masking import load_mhim_presets\n"
        "from hmil.training.losses import load_loss_presets\n"
        "print(json.dumps({'files': [m.__file__ for m in (hmil, plumbing, preprocessing)],\n"
        "    'hierarchies': [Hierarchy.preset(n).num_fine for n in ('bracs', 'panda', 'ccc')],\n"
        "    'loss': sorted(load_loss_presets()), 'mhim': sorted(load_mhim_presets())}))\n"
    )
    found = json.loads(run([installed, "-c", probe], elsewhere).stdout)
    environment = installed.parents[1].resolve()
    for file in found["files"]:
        assert Path(file).resolve().is_relative_to(environment), file
    assert found["hierarchies"] == [Hierarchy.preset(n).num_fine for n in ("bracs", "panda", "ccc")]
    assert {"hmil", "flat", "clam", "dsmil"} <= set(found["loss"])
    assert "abmil_c16" in found["mhim"]


def test_installed_train_command_keeps_its_help(installed, elsewhere):
    help_text = run([installed, "-m", "hmil.train", "--help"], elsewhere).stdout
    for option in ("--features", "--splits", "--hierarchy", "--loss-preset", "--mhim-preset"):
        assert option in help_text


def test_installed_package_trains_one_epoch_on_a_preset_hierarchy(installed, elsewhere):
    """`--hierarchy bracs` and the default loss preset come from the wheel's package data."""
    bracs = Hierarchy.preset("bracs")
    cohort = generate_cohort(
        bracs, SyntheticConfig(bags_per_class=4, feature_dim=16, min_instances=8, max_instances=16)
    )
    write_cohort(cohort, elsewhere / "features")
    table = cohort.table.copy()
    rank = table.groupby("label").cumcount()
    table["fold0"] = np.where(rank == 0, "test", np.where(rank == 1, "val", "train"))
    table.to_csv(elsewhere / "DATA_SPLIT.csv", index=False)
    run([installed, "-m", "hmil.train", "--features", "features", "--splits", "DATA_SPLIT.csv",
         "--fold", "0", "--model", "hmil", "--hierarchy", "bracs", "--out", "run",
         "--epochs", "1", "--batch-bags", "4", "--seed", "0"], elsewhere)  # fmt: skip
    metrics = json.loads((elsewhere / "run" / "metrics.json").read_text())
    assert metrics["config"]["loss_preset"] == "hmil"
    assert metrics["test"]["num_slides"] == bracs.num_fine
    assert (elsewhere / "run" / "model.pt").is_file()
