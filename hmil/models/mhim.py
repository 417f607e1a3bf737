"""MHIM-MIL models ``mhim_abmil``, ``mhim_transmil``, ``mhim_dsmil``: a student and its EMA
teacher in one module, trained by the ordinary trainer.

In training mode a forward scores the full bag with the teacher (no gradient), masks it
(:func:`hmil.models.mhim_masking.hard_instance_mask`) and runs the student on the kept
instances; the output is the student's (its attention then covers the kept instances only), with the
``consistency`` auxiliary term added. In eval mode a forward is the student's, so
predictions and attention maps are the student's on whole bags.

The trainer drives the schedules: ``set_training_progress(p)`` before each step (p ∈
[0, 1] of the whole run) and ``after_optimizer_step()`` after it (the EMA update). The
teacher starts from the same fold's trained baseline (:func:`load_teacher`).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hmil.models.abmil import ABMIL, abmil
from hmil.models.dsmil import dsmil
from hmil.models.mhim_masking import (
    MHIMConfig,
    cosine_schedule,
    ema_update_,
    hard_instance_mask,
    soft_target_cross_entropy,
)
from hmil.models.output import MILOutput
from hmil.models.registry import register_model
from hmil.models.transmil import transmil
from plumbing.checkpoint_files import UnreadableCheckpoint, load_checkpoint


class TeacherError(ValueError):
    """The --teacher checkpoint is missing, unreadable or of another model/data/fold."""


class MHIM(nn.Module):
    """An MHIM-MIL student with its EMA teacher.

    Args:
        student: the student model (ABMIL, TransMIL or DSMIL); the teacher is a copy.
        student_name: its registry name (a teacher checkpoint must be of this model).
        config: the MHIM hyper-parameters.
        preset: the name of the preset ``config`` came from, if any (recorded in outputs).
    """

    def __init__(
        self, student: nn.Module, student_name: str, config: MHIMConfig, preset: str | None
    ):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        if hasattr(self.teacher, "attention_layer"):
            self.teacher.attention_layer = config.attention_layer
        self.student_name = student_name
        self.config = config
        self.preset = preset
        self.loss_preset = getattr(student, "loss_preset", "flat")
        self.progress = 0.0

    def train(self, mode: bool = True) -> MHIM:
        super().train(mode)
        self.teacher.eval()  # the teacher scores deterministically
        return self

    def set_training_progress(self, progress: float) -> None:
        """Fraction of the whole run done, for the cosine schedules."""
        self.progress = progress

    def mask_ratio_h(self) -> float:
        if self.config.mask_ratio_h_decay:
            return cosine_schedule(self.config.mask_ratio_h, 0.0, self.progress)
        return self.config.mask_ratio_h

    def momentum(self) -> float:
        if self.config.momentum_schedule:
            return cosine_schedule(self.config.momentum, 1.0, self.progress)
        return self.config.momentum

    def after_optimizer_step(self) -> None:
        ema_update_(self.teacher, self.student, self.momentum())

    @torch.no_grad()
    def teacher_scores(self, bag: torch.Tensor, teacher_output: MILOutput) -> torch.Tensor:
        """[N] importance of each instance to the teacher: its attention (for class-wise
        attention, the row of the teacher's predicted class), or v2's class-aware scores."""
        if self.config.class_aware:
            return class_aware_scores(self.teacher, bag)
        attention = teacher_output.fine_attention
        if attention.shape[0] > 1:
            return attention[teacher_output.fine_logits.argmax()]
        return attention[0]

    def forward(self, bag: torch.Tensor) -> MILOutput:
        if not self.training:
            return self.student(bag)
        with torch.no_grad():
            teacher_output = self.teacher(bag)
            scores = self.teacher_scores(bag, teacher_output).float()
        keep = hard_instance_mask(
            scores,
            self.mask_ratio_h(),
            self.config.mask_ratio_l,
            self.config.mask_ratio,
            self.config.mask_ratio_hr,
        )
        output = self.student(bag[keep])
        auxiliary = dict(output.auxiliary or {})
        student_embedding, teacher_embedding = output.bag_embedding, teacher_output.bag_embedding
        if student_embedding is None or teacher_embedding is None:
            raise ValueError(f"{self.student_name} gives no bag_embedding for MHIM's consistency")
        auxiliary["consistency"] = lambda label: soft_target_cross_entropy(
            student_embedding,
            teacher_embedding,
            self.config.student_temperature,
            self.config.teacher_temperature,
        )
        return replace(output, auxiliary=auxiliary)


def class_aware_scores(model: nn.Module, bag: torch.Tensor) -> torch.Tensor:
    """[N] MHIM-v2 scores: the classifier on each attention-weighted instance, max class
    probability. TransMIL and DSMIL compute their own; ABMIL's is here."""
    if hasattr(model, "class_aware_scores"):
        return model.class_aware_scores(bag)
    if isinstance(model, ABMIL):
        instances = model.embedding(bag)  # [N, hidden]
        attention = model.attention(instances)[0]  # [N]
        logits = model.classifier(attention.unsqueeze(1) * instances)
        return torch.softmax(logits, dim=-1).amax(dim=-1)
    raise ValueError(f"no class-aware instance scores for {type(model).__name__}")


def file_digest(path: Path) -> str:
    """sha256 of a file (identifies the teacher a run was trained from)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_teacher(
    model: MHIM, path: str | Path, in_dim: int, fine_classes: list[str], fold: int
) -> str:
    """Initialise the teacher (and, per ``student_init``, the student) from a ``model.pt``
    written by ``hmil.train`` for the same baseline, features, hierarchy and fold.

    Returns the checkpoint's sha256. Raises TeacherError with one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"{path}: teacher checkpoint not found")
    try:
        checkpoint: Any = load_checkpoint(path)
    except UnreadableCheckpoint as error:  # any unreadable or unsafe file: one line
        raise TeacherError(f"{path}: cannot read teacher checkpoint ({error})") from None
    if isinstance(checkpoint, dict) and checkpoint.get("status") == "failed":
        raise TeacherError(f"{path}: the teacher's training failed ({checkpoint.get('reason')})")
    if not isinstance(checkpoint, dict) or not {"model", "state_dict"} <= set(checkpoint):
        raise TeacherError(f"{path}: not a model.pt written by hmil.train")
    expected = model.student_name
    if checkpoint["model"] != expected:
        raise TeacherError(
            f"{path}: teacher is a {checkpoint['model']!r} model; mhim_{expected} needs the "
            f"{expected!r} model.pt of the same fold"
        )
    if checkpoint.get("in_dim") != in_dim:
        raise TeacherError(
            f"{path}: teacher was trained on {checkpoint.get('in_dim')}-dimensional features, "
            f"these are {in_dim}-dimensional"
        )
    teacher_norm = (checkpoint.get("model_kwargs") or {}).get("slide_norm", "none")
    student_norm = getattr(model, "slide_norm", "none")
    if teacher_norm != student_norm:
        raise TeacherError(
            f"{path}: teacher was trained with slide_norm {teacher_norm!r}, this run uses "
            f"{student_norm!r} (train both with the same training.slide_norm)"
        )
    teacher_fine = list((checkpoint.get("hierarchy") or {}).get("fine", {}))
    if teacher_fine != list(fine_classes):
        raise TeacherError(
            f"{path}: teacher's fine classes {teacher_fine} differ from {list(fine_classes)}"
        )
    teacher_fold = (checkpoint.get("config") or {}).get("fold")
    if teacher_fold != fold:
        raise TeacherError(f"{path}: teacher was trained on fold {teacher_fold}, not fold {fold}")
    try:
        model.teacher.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise TeacherError(f"{path}: weights do not fit {expected} ({first_line})") from None
    if model.config.student_init == "all":
        model.student.load_state_dict(model.teacher.state_dict())
    elif model.config.student_init == "embedding" and hasattr(model.student, "embedding"):
        model.student.embedding.load_state_dict(model.teacher.embedding.state_dict())
    return file_digest(path)


def _mhim(student_name: str, student: nn.Module, mhim: str | MHIMConfig | dict | None) -> MHIM:
    if mhim is None:
        mhim = f"{student_name}_c16"
    if isinstance(mhim, str):
        return MHIM(student, student_name, MHIMConfig.preset(mhim), preset=mhim)
    if isinstance(mhim, dict):
        mhim = MHIMConfig.from_mapping(mhim)
    return MHIM(student, student_name, mhim, preset=None)


@register_model
def mhim_abmil(in_dim: int, num_fine: int, num_coarse: int, mhim=None, **kwargs) -> MHIM:
    """MHIM-MIL with an ABMIL student. ``mhim``: preset name (default ``abmil_c16``),
    field mapping or MHIMConfig; other kwargs go to the student."""
    return _mhim("abmil", abmil(in_dim, num_fine, num_coarse, **kwargs), mhim)


@register_model
def mhim_transmil(in_dim: int, num_fine: int, num_coarse: int, mhim=None, **kwargs) -> MHIM:
    """MHIM-MIL with a TransMIL student (default preset ``transmil_c16``)."""
    return _mhim("transmil", transmil(in_dim, num_fine, num_coarse, **kwargs), mhim)


@register_model
def mhim_dsmil(in_dim: int, num_fine: int, num_coarse: int, mhim=None, **kwargs) -> MHIM:
    """MHIM-MIL with a DSMIL student (default preset ``dsmil_c16``)."""
    return _mhim("dsmil", dsmil(in_dim, num_fine, num_coarse, **kwargs), mhim)
