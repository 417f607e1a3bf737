"""What a deployment is given: its configuration, and the cohort's slides and features.

Everything that can be refused without running a model is refused here: a label the
hierarchy lacks, features made another way than the training features (encoder, weights,
dimension, patch size, mpp), a folder with none of the sheet's features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from hmil.data.bags import (
    BagError,
    find_feature_file,
    flagged_reason,
    read_bag_shape,
)
from hmil.data.feature_record import read_feature_record, record_mismatch
from hmil.data.hierarchy import Hierarchy, HierarchyError
from hmil.evaluation.fold_models import FoldModel
from hmil.evaluation.settings import DeploySettings
from plumbing.errors import PipelineError
from preprocessing.slides.sheet import read_slide_sheet

log = logging.getLogger("hmil.deploy")


class DeployError(PipelineError):
    """Deployment cannot run as asked (wrong features, unknown label, nothing to predict)."""


@dataclass(frozen=True, kw_only=True)
class DeployConfig(DeploySettings):
    """Everything a deployment needs: its settings
    (:class:`~hmil.evaluation.settings.DeploySettings`), the runs, the cohort and where the
    outputs go; built once from the command line."""

    run_dirs: tuple[Path, ...]
    sheet: Path
    features_dir: Path
    out: Path
    cohort: str = "external"
    strict: bool = False

    def params(self) -> dict[str, Any]:
        return {
            "cohort": self.cohort,
            "sheet": str(self.sheet),
            "features_dir": str(self.features_dir),
            "run_dirs": [str(d) for d in self.run_dirs],
            "bootstrap": self.bootstrap,
            "seed": self.seed,
            "strict": self.strict,
        }


@dataclass
class Cohort:
    """The sheet's slides with their feature files, and the ones that cannot be used."""

    slides: pd.DataFrame  #: slide_id, patient_id, fine_label (None when unlabelled), path
    failed: dict[str, str] = field(default_factory=dict)  #: slide_id → reason


# ---- inputs ----------------------------------------------------------------------------------


def read_cohort(config: DeployConfig, hierarchy: Hierarchy) -> pd.DataFrame:
    """slide_id, patient_id and fine_label (None where the sheet gives none) of the sheet.

    A label the hierarchy lacks is an error: a typo or another hierarchy would otherwise
    give wrong external metrics; a sheet without labels gives predictions only.
    """
    sheet = read_slide_sheet(config.sheet, require_labels=False, require_paths=False)
    labels = sheet["label"] if "label" in sheet.columns else pd.Series(None, index=sheet.index)
    patients = sheet["patient_id"] if "patient_id" in sheet.columns else sheet["slide_id"]
    fine_labels: list[str | None] = []
    for slide_id, label in labels.items():
        if label is None or pd.isna(label) or not str(label).strip():
            fine_labels.append(None)
            continue
        try:
            fine_labels.append(hierarchy.fine[hierarchy.fine_index(label)])
        except HierarchyError as error:
            raise DeployError(
                f"{config.sheet}: slide {slide_id!r}: {error}; the models predict the classes "
                "of their training hierarchy (leave `label` empty to predict only)"
            ) from None
    return pd.DataFrame(
        {
            "slide_id": sheet["slide_id"].astype(str).to_list(),
            "patient_id": patients.fillna(sheet["slide_id"]).astype(str).to_list(),
            "fine_label": fine_labels,
        }
    )


def locate_features(config: DeployConfig, slides: pd.DataFrame, models: list[FoldModel]) -> Cohort:
    """The slides' feature files, checked against the models' training features.

    A missing or flagged file fails that slide only; features made another way fail the
    deployment (every slide would be wrong, so nothing is written).
    """
    trained = models[0].features
    paths, failed = [], {}
    for slide_id in slides["slide_id"]:
        try:
            path = find_feature_file(config.features_dir, slide_id)
        except BagError:
            failed[slide_id] = f"no feature file {config.features_dir / slide_id}.h5 (or .pt)"
            paths.append(None)
            continue
        reason = flagged_reason(path)
        if reason is not None:
            failed[slide_id] = f"{path}: flagged features ({reason})"
            paths.append(None)
            continue
        mismatch = record_mismatch(trained, read_feature_record(path))
        if mismatch is not None:
            raise DeployError(
                f"{path}: {mismatch} ({models[0].run_dir / 'model.pt'}); patch and encode "
                "the deployed cohort with the training cohort's settings"
            )
        _, dim = read_bag_shape(path, slide_id)
        if dim != models[0].in_dim:
            raise DeployError(
                f"{path}: {dim}-d features but the models take {models[0].in_dim}-d ones "
                "(features of another encoder?)"
            )
        paths.append(path)
    if len(failed) == len(slides):
        raise DeployError(
            f"{config.features_dir}: holds usable features of none of the {len(slides)} "
            f"slides of {config.sheet} (first: {next(iter(failed.values()))})"
        )
    if failed and config.strict:
        slide_id, reason = next(iter(failed.items()))
        raise DeployError(f"slide {slide_id!r}: {reason} (strict: every slide must be usable)")
    slides = slides.assign(path=paths)
    return Cohort(slides=slides[slides["path"].notna()].reset_index(drop=True), failed=failed)
