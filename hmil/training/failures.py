"""A failed run recorded as the fold's outputs, so that a cohort run goes on: evaluation
leaves the fold out, the comparison names the run, and an MHIM student of a failed baseline
fails naming it."""

from __future__ import annotations

import logging
import sys
from dataclasses import fields
from pathlib import Path

import h5py
import torch

from hmil.training.config import TrainSettings
from hmil.training.outputs import FINAL_OUTPUTS, write_json
from hmil.training.settings import recorded
from plumbing.atomic import atomic_outputs, buffered
from plumbing.errors import PipelineError
from plumbing.provenance import code_version

log = logging.getLogger("hmil.train")  # the command's logger: its log lines name it


def failure_reason(error: Exception) -> str:
    """The error's one line; a bug or a resource error (e.g. out of memory) also leaves its
    traceback in the log."""
    if isinstance(error, PipelineError):
        return str(error)
    log.error("training failed", exc_info=error)
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def record_failure(settings: TrainSettings, out: Path, error: Exception) -> int:
    """Write every final output of the fold in ``out``, each marked failed with the reason.
    Nothing looks like a trained model: model.pt holds no weights, predictions.csv no rows,
    attention.h5 no slide. Returns the exit code, 0: the cohort run goes on."""
    reason = failure_reason(error)
    # what was asked for, in the order of a run's record (the presets, resolved only by
    # building the model, left out)
    presets = ("loss_preset", "teacher", "mhim_preset")
    requested = recorded(
        {f.name: getattr(settings, f.name) for f in fields(settings) if f.name not in presets}
    )
    failure = {"status": "failed", "reason": reason, "code_version": code_version()}
    history = out / "log.csv"
    with atomic_outputs(*(out / name for name in FINAL_OUTPUTS)) as temps:
        model_tmp, predictions_tmp, metrics_tmp, attention_tmp, log_tmp = temps
        with buffered(model_tmp) as buffer:
            torch.save({**failure, "model": settings.model, "config": requested}, buffer)
        predictions_tmp.write_text("slide_id,patient_id,split,fine_label,coarse_label\n")
        write_json(metrics_tmp, {**failure, "config": requested, "seed": settings.seed})
        with buffered(attention_tmp) as buffer, h5py.File(buffer, "w") as file:
            file.attrs.update({**failure, "model": settings.model})
        if history.is_file():  # the epochs it got through, if any
            log_tmp.write_bytes(history.read_bytes())
        else:
            log_tmp.write_text("epoch\n")
    print(
        f"error: {reason} (recorded as a failed run in {out}; strict mode makes it fatal)",
        file=sys.stderr,
    )
    return 0
