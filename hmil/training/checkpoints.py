"""Resuming and skipping runs: last.pt (rewritten every epoch, with log.csv beside it), the
fingerprint of the inputs a checkpoint was made from, and what an earlier run left in the
output directory."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hmil.data.bags import BagDataset
from hmil.training.config import TrainConfig, TrainingError
from hmil.training.outputs import FINAL_OUTPUTS
from hmil.training.selection import TrainingState
from plumbing.atomic import atomic_outputs, buffered
from plumbing.checkpoint_files import checkpoint_problem

log = logging.getLogger("hmil.train")  # the command's logger: its log lines name it

#: What last.pt holds besides tensors and plain data: NumPy's RNG state, an array. Only
#: these are let through torch's weights-only unpickler (an array is rebuilt from its bytes;
#: nothing is called that the file names), so a last.pt made to run code is refused too.
NUMPY_ARRAY_GLOBALS = [
    np.arange(1).__reduce__()[0],  # numpy's _reconstruct, wherever this numpy keeps it
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def load_last_checkpoint(path: Path) -> dict[str, Any]:
    """last.pt, read as tensors, plain data and NumPy arrays only."""
    with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class Checkpoint:
    """last.pt of a run: resumed only by a run of the same config on the same inputs
    (:func:`input_fingerprint`)."""

    path: Path
    config: TrainConfig
    inputs: str

    def resume_or_start(self, model, optimizer, scheduler) -> TrainingState:
        """The state to train on from: last.pt's, loaded into model, optimizer and scheduler,
        or a new one when there is no last.pt or it was made from other inputs."""
        if not self.path.is_file():
            return TrainingState()
        resumed = self.resume(model, optimizer, scheduler)
        if resumed is None:
            log.warning("%s: the features or splits changed since; starting afresh", self.path)
            self.path.unlink()
            return TrainingState()
        log.info("resuming %s after epoch %d", self.path, resumed.epoch - 1)
        return resumed

    def resume(self, model, optimizer, scheduler) -> TrainingState | None:
        """The training state of the checkpoint, loaded into model, optimizer and scheduler;
        None when it was made from other inputs (then nothing is loaded)."""
        try:
            checkpoint = load_last_checkpoint(self.path)
        except Exception as error:  # a truncated file cannot happen (atomic), a foreign one can
            raise TrainingError(
                f"{self.path}: cannot read checkpoint ({checkpoint_problem(error)})"
            ) from None
        if checkpoint.get("config") != self.config.as_dict():
            raise TrainingError(
                f"{self.path}: checkpoint of a run with other settings; delete it to start over"
            )
        if checkpoint.get("inputs") != self.inputs:
            return None
        try:
            state = TrainingState.of_saved(checkpoint.get("state"))
        except ValueError as error:
            raise TrainingError(
                f"{self.path}: not a checkpoint this version resumes ({error}); delete it to "
                "start over"
            ) from None
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng_states(checkpoint["rng"])
        return state

    def save(self, model, optimizer, scheduler, state: TrainingState) -> None:
        """last.pt and log.csv (the epochs so far), renamed into place together."""
        log_path = self.path.with_name("log.csv")
        with (
            atomic_outputs(self.path, log_path) as (last_tmp, log_tmp),
            buffered(last_tmp) as buffer,
        ):
            torch.save(
                {
                    "config": self.config.as_dict(),
                    "inputs": self.inputs,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_states(),
                    "state": state.as_saved(),
                },
                buffer,
            )
            pd.DataFrame(state.history).to_csv(log_tmp, index=False)


def input_fingerprint(splits: str | Path, datasets: dict[str, BagDataset]) -> str:
    """Identity of the run's inputs: the splits file's bytes and each feature file's name,
    size and modification time. A checkpoint of other inputs (a feature file rebuilt or
    re-extracted since, as the workflow does before re-running a fold) is not resumed."""
    digest = hashlib.sha256(Path(splits).read_bytes())
    for split, dataset in sorted(datasets.items()):
        for slide_id, path in zip(dataset.slide_ids, dataset.paths, strict=True):
            status = path.stat()
            digest.update(
                f"{split}/{slide_id}/{path}/{status.st_size}/{status.st_mtime_ns}\n".encode()
            )
    return digest.hexdigest()


def rng_states() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, for a checkpoint."""
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])  # noqa: NPY002
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def finished_run(out: Path, config: TrainConfig) -> bool:
    """True when every final output exists and metrics.json records this config (a
    recorded failure is not finished: it is trained again)."""
    if not all((out / name).is_file() for name in FINAL_OUTPUTS):
        return False
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if metrics.get("status") == "failed":
        return False
    if metrics.get("config") != config.as_dict():
        raise TrainingError(
            f"{out}: holds outputs of a run with other settings; use another --out or delete them"
        )
    return True


def discard_other_settings(out: Path, config: TrainConfig) -> None:
    """Delete outputs and checkpoint of an earlier run of ``out`` made with other settings.

    The workflow reruns a fold when its settings change; it should then start afresh
    rather than stop at the mismatch that protects hand-made runs.
    """
    recorded = []
    metrics_path, last_path = out / "metrics.json", out / "last.pt"
    if metrics_path.is_file():
        try:
            recorded.append(json.loads(metrics_path.read_text()).get("config"))
        except (OSError, json.JSONDecodeError):
            recorded.append(None)
    if last_path.is_file():
        try:
            recorded.append(load_last_checkpoint(last_path)["config"])
        except Exception:  # unreadable or foreign: not resumable either
            recorded.append(None)
    if all(settings == config.as_dict() for settings in recorded):
        return
    log.warning("%s: outputs of a run with other settings; starting afresh", out)
    for name in (*FINAL_OUTPUTS, "last.pt"):
        (out / name).unlink(missing_ok=True)
