"""The training settings are declared once (hmil/training/settings.py); the command's
options, the workflow's schema and flags, and the records all follow from them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hmil.training.settings import (
    PROTOCOLS,
    SETTING_NAMES,
    TrainingError,
    TrainingSettings,
    recorded,
    schema_properties,
    setting_flags,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())


def test_the_workflow_schema_holds_each_training_setting_as_declared():
    training = SCHEMA["properties"]["training"]["properties"]
    declared = schema_properties()
    assert {name: training[name] for name in declared} == declared
    # what else the section holds places the job or seeds it, and is not a protocol's
    assert set(training) - set(declared) == {"seed", "device", "threads", "gpus", "mem_mb"}


def test_the_protocols_give_the_settings_they_always_gave():
    assert PROTOCOLS["default"] == {
        "epochs": 50, "batch_bags": 8, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 1e-4,
        "scheduler": "warmup_cosine", "warmup_epochs": 1.0, "lr_floor": 0.05, "patience": 15,
        "min_epochs": "auto", "dropout": 0.25, "instance_dropout": 0.25,
        "balanced_sampling": False, "class_weights": "none", "slide_norm": "auto",
        "selection": "loss",
    }  # fmt: skip
    assert PROTOCOLS["paper"] == {
        "epochs": 200, "batch_bags": 64, "lr": 1e-4, "optimizer": "adam", "weight_decay": 0.0,
        "scheduler": "plateau", "warmup_epochs": 0.0, "lr_floor": 0.0, "patience": 20,
        "min_epochs": 0, "dropout": 0.0, "instance_dropout": 0.0, "balanced_sampling": False,
        "class_weights": "none", "slide_norm": "none", "selection": "auc",
    }  # fmt: skip


def test_settings_not_given_take_the_protocols_and_text_is_read_as_its_type():
    settings = TrainingSettings(
        protocol="paper", epochs=3, min_epochs="2", balanced_sampling="true"
    )
    assert (settings.epochs, settings.lr, settings.min_epochs) == (3, 1e-4, 2)
    assert settings.balanced_sampling is True


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"epochs": 0}, "--epochs must be ≥ 1"),
        ({"dropout": 1.0}, r"--dropout must be in \[0, 1\)"),
        ({"weight_decay": -1.0}, "--weight-decay must be ≥ 0"),
        ({"lr": 0.0}, "--lr must be > 0"),
        ({"min_epochs": "soon"}, "--min-epochs: expected a number or auto, not 'soon'"),
        ({"optimizer": "sgd"}, "--optimizer must be one of: adam, adamw"),
        ({"slide_norm": "z"}, "--slide-norm must be one of: none, center, standardize"),
        ({"balanced_sampling": "maybe"}, "--balanced-sampling: expected true or false"),
        ({"protocol": "fast"}, "unknown protocol 'fast'"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_option(given, message):
    with pytest.raises(TrainingError, match=message):
        TrainingSettings(**given)


def test_the_workflow_and_the_learning_check_pass_the_config_as_flags_in_one_order():
    training = {"protocol": "paper", "seed": 3, "device": "cpu", "slide_norm": "center",
                "epochs": 5, "balanced_sampling": True}  # fmt: skip
    assert setting_flags(training) == [
        "--protocol", "paper", "--epochs", "5", "--balanced-sampling", "True",
        "--slide-norm", "center",
    ]  # fmt: skip
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import learning_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    check_flags = learning_check.TRAINING_FLAGS
    assert check_flags == ("protocol", *SETTING_NAMES)


def test_records_keep_their_key_order_and_leave_new_settings_out_at_their_default():
    values = {"slide_norm": "none", "balanced_sampling": True, "protocol": "default",
              "hierarchy": {}, "lr": 0.1, "model": "abmil", "mhim_preset": "x"}  # fmt: skip
    assert list(recorded(values)) == [
        "model",
        "lr",
        "hierarchy",
        "protocol",
        "balanced_sampling",
        "mhim_preset",
    ]


def test_the_workflow_reads_the_settings_without_torch():
    code = "import sys, hmil.training.settings; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
