"""``slide_norm: auto``: centre each slide only where the training slides' centres carry no
class information.

Why: a slide's mean instance holds two things, what its class adds (the first signal
attention pooling learns from, lost when slides are centred) and what its stain, scanner
or site adds (one offset over all its instances, which models with a readout per class
memorise). The learning check's cohorts show both sides: centring costs `hmil_mb` 0.09–0.41
fine AUC where slides carry no offset and gains it 0.41 where the offset is as large as the
key-instance signal (benchmarks/README.md, "Learning check"). Which side a cohort is on can
be asked of its training slides, once per fold, before any model sees them: do the slide
means differ between fine classes more than between patients of one class? A permutation
test of the one-way between-class share of their variance (the trace form of MANOVA's F,
so any feature width works, D > patients included) answers it. Its units are patients
(the mean of a patient's slides of one class), not slides: a patient's slides share a
scanner and a staining batch, so they are not independent draws, as the patient-grouped
folds assume too; counted as slides they would make a site effect look like a class
effect. Where the answer is no (p ≥ ``ALPHA``), the centre is nuisance and is taken out;
otherwise nothing changes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from hmil.data.bags import BagDataset

log = logging.getLogger("hmil.train")  # the command's logger: its log lines name it

#: Level of the test: centre when the slide means show no class effect at this level.
ALPHA = 0.05
#: Label permutations of the test (p-values in steps of 1/1000).
PERMUTATIONS = 999
#: The permutations' own seed: the choice depends on the training slides only.
TEST_SEED = 0


@dataclass(frozen=True)
class SlideNormChoice:
    """The ``slide_norm`` a run's models use and, for ``auto``, the test that chose it."""

    setting: str
    mode: str
    statistic: float | None = None
    p_value: float | None = None
    slides: int | None = None
    patients: int | None = None

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def class_effect_on_centres(
    centres: torch.Tensor,
    labels: torch.Tensor,
    permutations: int = PERMUTATIONS,
    seed: int = TEST_SEED,
) -> tuple[float, float]:
    """(F, p) of the class effect on the centres [n, D] (labels [n], long): F is the
    between-class mean square over the within-class one, summed over features; p counts
    the label permutations whose between-class sum of squares reaches the observed one."""
    centres = centres.double() - centres.double().mean(dim=0)
    classes, labels = torch.unique(labels, return_inverse=True)
    n, num_classes = len(labels), len(classes)
    if num_classes < 2 or n <= num_classes:
        raise ValueError(f"need ≥ 2 classes and more slides than classes, got {num_classes}, {n}")
    if centres.shape[1] > n:  # the same sums of squares in the span of the slides
        left, values, _ = torch.linalg.svd(centres, full_matrices=False)
        centres = left * values
    counts = torch.bincount(labels, minlength=num_classes).double()
    total = float(centres.square().sum())

    def between(assigned: torch.Tensor) -> float:
        sums = torch.zeros(num_classes, centres.shape[1], dtype=centres.dtype)
        sums.index_add_(0, assigned, centres)
        return float((sums.square().sum(dim=1) / counts).sum())

    observed = between(labels)
    generator = torch.Generator().manual_seed(seed)
    null = np.array([between(labels[torch.randperm(n, generator=generator)])
                     for _ in range(permutations)])  # fmt: skip
    within = max(total - observed, 1e-12)
    statistic = (observed / (num_classes - 1)) / (within / (n - num_classes))
    p_value = (1 + int((null >= observed - 1e-9 * max(total, 1.0)).sum())) / (permutations + 1)
    return statistic, p_value


def patient_centres(
    slide_centres: torch.Tensor, patients: Sequence[str], labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean centre [U, D] and label [U] of each patient's slides of one fine class."""
    units = pd.DataFrame({"patient": list(patients), "label": labels.numpy()})
    unit = torch.tensor(units.groupby(["patient", "label"], sort=False).ngroup().to_numpy())
    count = torch.bincount(unit).to(slide_centres.dtype)
    sums = torch.zeros(len(count), slide_centres.shape[1], dtype=slide_centres.dtype)
    sums.index_add_(0, unit, slide_centres)
    unit_labels = torch.zeros(len(count), dtype=torch.long).scatter_(0, unit, labels)
    return sums / count[:, None], unit_labels


def slide_means(dataset: BagDataset) -> torch.Tensor:
    """float64 [n, D]: each training slide's mean instance (one read of every bag, which
    also fills the feature cache the epochs use)."""
    means = torch.empty(len(dataset), dataset.feature_dim, dtype=torch.float64)
    for index in tqdm(range(len(dataset)), desc="slide means", disable=None, leave=False):
        means[index] = dataset[index].features.double().mean(dim=0)
    return means


def choose_slide_norm(
    setting: str, train_set: BagDataset, patients: Sequence[str]
) -> SlideNormChoice:
    """The setting itself, or for ``auto`` ``center`` when the training slides' means show
    no class effect between patients (p ≥ ALPHA) and ``none`` when they do (or cannot be
    tested). ``patients``: the patient of each slide of ``train_set``, in its order."""
    if setting != "auto":
        return SlideNormChoice(setting, setting)
    labels = torch.as_tensor(np.asarray(train_set.fine_labels), dtype=torch.long)
    centres, unit_labels = patient_centres(slide_means(train_set), patients, labels)
    counted = {"slides": len(labels), "patients": len(unit_labels)}
    try:
        statistic, p_value = class_effect_on_centres(centres, unit_labels)
    except ValueError as error:
        log.warning("slide_norm auto: %s; slides are not centred", error)
        return SlideNormChoice(setting, "none", **counted)
    mode = "center" if p_value >= ALPHA else "none"
    log.info(
        "slide_norm auto: the mean instances of %d training slides (%d patients) %s by "
        "fine class (F = %.2f, p = %.3f): %s",
        len(labels), len(unit_labels), "do not differ" if mode == "center" else "differ",
        statistic, p_value,
        "each slide is centred (its offset is nuisance)" if mode == "center"
        else "slides are not centred",
    )  # fmt: skip
    return SlideNormChoice(setting, mode, statistic, p_value, **counted)
