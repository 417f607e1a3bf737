"""MHIM-MIL's training core (Tang et al., ICCV 2023; v2 2025): masks, EMA teacher, loss.

An EMA teacher scores every instance of the full bag; the student trains on the bag with

(a) ``mask_ratio_h`` of the instances masked at random among the top ``mask_ratio_h /
    mask_ratio_hr`` by teacher score (the hard instances; ratio cosine-decayed to 0 over
    training when ``mask_ratio_h_decay``),
(b) the ``mask_ratio_l`` lowest-scoring instances masked, and
(c) ``mask_ratio`` of the instances dropped at random from the rest,

and the loss CE + ``cl_alpha`` · soft-target cross-entropy between the student's and the
teacher's bag embeddings (softmax over the embedding dimensions, teacher temperature 0.1).
After every optimiser step the teacher moves towards the student by (1 − m), m = 0.9999
(cosine-scheduled to 1 with ``momentum_schedule``).

Counts are exact: ⌈r·N⌉ instances per kind, from disjoint pools (the original takes a
union of possibly overlapping sets), and at least one instance is always kept. The
model wrapper that uses these lives in :mod:`hmil.models.mhim`; the original settings
are presets in ``hmil/presets/mhim_presets.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import ClassVar, Literal

import torch
from torch import nn

from plumbing.presets import PresetFile, PresetSettings

#: The shipped presets (package data); users pass their own file as ``path``.
MHIM_PRESETS_PATH = resources.files("hmil.presets") / "mhim_presets.yaml"

# ⌈r·N⌉ without float noise turning 30.000000000000004 into 31
_CEIL_TOLERANCE = 1e-9


@dataclass(frozen=True)
class MHIMConfig(PresetSettings):
    """MHIM-MIL hyper-parameters (names follow the original's options).

    Attributes:
        mask_ratio: fraction of the instances dropped at random (after the two below).
        mask_ratio_l: fraction of lowest-scoring instances masked.
        mask_ratio_h: fraction of highest-scoring (hard) instances masked.
        mask_ratio_hr: the hard ones are drawn at random from the top mask_ratio_h /
            mask_ratio_hr (≤ 1) of the bag; 1 masks exactly the top ones.
        mask_ratio_h_decay: cosine-decay mask_ratio_h to 0 over training (``mrh_sche``).
        momentum: EMA momentum m of the teacher.
        momentum_schedule: cosine-schedule m to 1 over training (``mm_sche``).
        cl_alpha: weight of the consistency loss.
        teacher_temperature, student_temperature: of the embedding softmaxes (0.1, 1).
        student_init: what the student copies from the teacher checkpoint at the start:
            ``embedding`` (its first projection; the original's ``fc``), ``all`` or ``none``.
        class_aware: score instances with v2's class-aware scores (the teacher's classifier
            on each attention-weighted instance; max class probability) instead of attention.
        attention_layer: which layer's class-token attention scores instances (TransMIL).
    """

    mask_ratio: float = 0.0
    mask_ratio_l: float = 0.0
    mask_ratio_h: float = 0.0
    mask_ratio_hr: float = 1.0
    mask_ratio_h_decay: bool = False
    momentum: float = 0.9999
    momentum_schedule: bool = False
    cl_alpha: float = 0.0
    teacher_temperature: float = 0.1
    student_temperature: float = 1.0
    student_init: Literal["none", "embedding", "all"] = "embedding"
    class_aware: bool = False
    attention_layer: int = -1

    PRESETS: ClassVar[PresetFile] = MHIM_PRESETS_PATH
    KIND: ClassVar[str] = "MHIM"

    def __post_init__(self) -> None:
        for name in ("mask_ratio", "mask_ratio_l", "mask_ratio_h", "momentum"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MHIM {name} must be in [0, 1], got {value}")
        if not 0.0 < self.mask_ratio_hr <= 1.0:
            raise ValueError(f"MHIM mask_ratio_hr must be in (0, 1], got {self.mask_ratio_hr}")
        if self.cl_alpha < 0:
            raise ValueError(f"MHIM cl_alpha must be ≥ 0, got {self.cl_alpha}")
        if self.teacher_temperature <= 0 or self.student_temperature <= 0:
            raise ValueError("MHIM temperatures must be positive")
        if self.student_init not in ("none", "embedding", "all"):
            raise ValueError(
                f"MHIM student_init must be none, embedding or all, got {self.student_init!r}"
            )


def load_mhim_presets(path: PresetFile = MHIM_PRESETS_PATH) -> dict[str, MHIMConfig]:
    """All presets of an MHIM preset YAML file (``name: {field: value, ...}``), validated."""
    return MHIMConfig.presets(path)


def cosine_schedule(start: float, end: float, progress: float) -> float:
    """start at progress 0, end at progress 1, along half a cosine."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0


def _count(ratio: float, num_instances: int) -> int:
    return math.ceil(ratio * num_instances - _CEIL_TOLERANCE) if ratio > 0 else 0


@dataclass(frozen=True)
class MaskCounts:
    """How many instances of a bag of N each mask takes; ``kept`` = N − the three (≥ 1)."""

    candidates: int  # the top instances the hard ones are drawn from
    high: int
    low: int
    random: int
    kept: int


def mask_counts(
    num_instances: int, mask_ratio_h: float, mask_ratio_l: float, mask_ratio: float, hr: float
) -> MaskCounts:
    """Exact counts: ⌈r·N⌉ per kind, capped so that at least one instance stays."""
    budget = num_instances - 1  # never mask everything
    candidates = min(num_instances, _count(min(1.0, mask_ratio_h / hr), num_instances))
    high = min(_count(mask_ratio_h, num_instances), candidates, budget)
    low = min(_count(mask_ratio_l, num_instances), num_instances - candidates, budget - high)
    random = min(_count(mask_ratio, num_instances), budget - high - low)
    return MaskCounts(candidates, high, low, random, num_instances - high - low - random)


def hard_instance_mask(
    scores: torch.Tensor,
    mask_ratio_h: float,
    mask_ratio_l: float,
    mask_ratio: float,
    mask_ratio_hr: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices of the instances the student keeps, ascending (instance order preserved).

    Args:
        scores: [N] teacher scores (attention), higher = more important.
        mask_ratio_h, mask_ratio_l, mask_ratio, mask_ratio_hr: see :class:`MHIMConfig`
            (mask_ratio_h already scheduled).
        generator: for the random draws (default: torch's global generator).

    Ranks the bag once; the hard mask is a random subset of the top candidates, the low
    mask the lowest-ranked instances outside the candidates, the random mask a random
    subset of what is left. No loop over instances.
    """
    num_instances = scores.shape[0]
    counts = mask_counts(num_instances, mask_ratio_h, mask_ratio_l, mask_ratio, mask_ratio_hr)
    device = scores.device
    ranking = torch.argsort(scores, descending=True)  # ranked position → instance
    masked = torch.zeros(num_instances, dtype=torch.bool, device=device)  # by position
    if counts.high:
        pick = torch.randperm(counts.candidates, generator=generator, device="cpu")
        masked[pick[: counts.high].to(device)] = True
    if counts.low:
        masked[num_instances - counts.low :] = True
    if counts.random:
        free = (~masked).nonzero().squeeze(1)
        pick = torch.randperm(len(free), generator=generator, device="cpu")[: counts.random]
        masked[free[pick.to(device)]] = True
    return ranking[~masked].sort().values


def soft_target_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_temperature: float = 1.0,
    teacher_temperature: float = 0.1,
) -> torch.Tensor:
    """−Σ_d softmax(teacher/τ_t)_d · log softmax(student/τ_s)_d over the embedding
    dimensions (last axis), averaged over any leading axes; no gradient to the teacher."""
    target = torch.softmax(teacher.detach().float() / teacher_temperature, dim=-1)
    log_probs = torch.log_softmax(student.float() / student_temperature, dim=-1)
    return -(target * log_probs).sum(dim=-1).mean()


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher ← m·teacher + (1 − m)·student, parameter by parameter; buffers copied."""
    for teacher_param, student_param in zip(
        teacher.parameters(), student.parameters(), strict=True
    ):
        teacher_param.lerp_(student_param.detach(), 1.0 - momentum)
    for teacher_buffer, student_buffer in zip(teacher.buffers(), student.buffers(), strict=True):
        teacher_buffer.copy_(student_buffer)
