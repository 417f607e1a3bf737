"""Features of one slide: from its patches file to its features files.

A valid existing output is kept (`validate_features`, and a verdict on unreadable patches
made with today's allowed fraction); an invalid one is rebuilt with a log line saying why.
A flagged patches file (no tissue, failed slide) gives an empty features file flagged the
same way, so every slide of a sheet has its output and training names what it leaves out.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from plumbing.errors import PipelineError, SlideError
from plumbing.provenance import code_version
from preprocessing.features.encoders import (
    RANDOM_WEIGHTS,
    RANDOM_WEIGHTS_SEED,
    EncoderSpec,
    build_encoder,
)
from preprocessing.features.features_files import validate_features, write_features
from preprocessing.features.patch_dataset import PatchDataset, ReadGeometry, read_geometry
from preprocessing.features.runner import EncoderRunner, Extraction, extract_features
from preprocessing.features.settings import DEFAULT_MAX_UNREADABLE_FRACTION
from preprocessing.features.unreadable import stale_verdict, unreadable_verdict
from preprocessing.slides.access import open_slide
from preprocessing.slides.patch_files import STATUS_FAILED, STATUS_OK, Patches, read_patches

log = logging.getLogger("hmil.extract")


@dataclass(frozen=True)
class ExtractParams:
    """How a run encodes; recorded in every output (`params`), with the slide."""

    encoder: str
    weights: str | None
    batch_size: int
    workers: int
    device: str
    precision: str
    dtype: str
    on_bad_patch: str
    compile: bool
    max_unreadable_fraction: float = DEFAULT_MAX_UNREADABLE_FRACTION


@dataclass(frozen=True)
class SlideJob:
    """One slide's inputs and outputs."""

    slide_id: str
    slide: Path
    patches: Path
    out: Path
    out_pt: Path | None


class LazyRunner:
    """The encoder, built on first use and then kept: slides that need no computing (valid
    outputs, flagged patches files) never load the model."""

    def __init__(self, device: torch.device, params: ExtractParams):
        self.device, self.params = device, params
        self._runner: EncoderRunner | None = None

    def get(self) -> EncoderRunner:
        if self._runner is None:
            params = self.params
            if params.device == "auto" and self.device.type == "cpu":
                log.warning("no CUDA GPU available: extracting on the CPU")
            model, spec, _ = build_encoder(params.encoder, params.weights)
            self._runner = EncoderRunner(
                model, spec, self.device, params.precision, params.compile, params.batch_size
            )
            if params.compile:
                log.info("compiled %s in %.1f s", spec.name, self._runner.warm_up())
        return self._runner


@dataclass(frozen=True)
class KeptFeatures:
    """A slide whose existing features file was complete and valid: kept, not recomputed."""

    slide_id: str
    out: Path
    is_warning = False

    def words(self) -> str:
        return f"{self.slide_id}: {self.out} is already complete and valid; skipped"


@dataclass(frozen=True)
class FlaggedPatches:
    """A slide whose patches file is flagged (no tissue, failed slide): an empty features
    file flagged the same way was written."""

    slide: Path
    out: Path
    status: str
    reason: str
    is_warning = True

    def words(self) -> str:
        return (
            f"warning: {self.slide}: patches file is flagged {self.status} ({self.reason}); "
            f"wrote an empty features file {self.out}"
        )


@dataclass(frozen=True)
class ExtractedFeatures:
    """A slide encoded: how many patches, by what, how fast, and the file's verdict on its
    unreadable patches (``status`` failed: too many; ``unreadable`` > 0: degraded)."""

    slide_id: str
    slide: Path
    n_patches: int
    feature_dim: int
    encoder: str
    precision: str
    device: str
    patches_per_second: float
    status: str
    reason: str
    unreadable: int

    @property
    def is_warning(self) -> bool:
        return self.status == STATUS_FAILED or self.unreadable > 0

    def words(self) -> str:
        line = (
            f"{self.slide_id}: {self.n_patches} patches → {self.feature_dim}-d features "
            f"({self.encoder}, {self.precision} on {self.device}), "
            f"{self.patches_per_second:.1f} patches/s"
        )
        if self.status == STATUS_FAILED:
            return f"warning: {self.slide}: recorded as failed: {self.reason}; {line}"
        if self.unreadable:
            return f"warning: {self.slide}: degraded: {self.reason}; {line}"
        return line


#: What encoding one slide gave; ``words()`` is its summary line.
SlideOutcome = KeptFeatures | FlaggedPatches | ExtractedFeatures


def encode_slide(
    job: SlideJob,
    spec: EncoderSpec,
    record: str,
    params: ExtractParams,
    runner: LazyRunner,
    no_progress: bool,
) -> SlideOutcome:
    """Make the outputs of one slide (keeping valid ones); returns what it gave."""
    patches = read_patches(job.patches)
    if job.out.exists():
        problem = validate_features(
            job.out, job.patches, spec.name, record, params.dtype, job.out_pt
        )
        problem = problem or stale_verdict(job.out, params.max_unreadable_fraction)
        if problem is None:
            return KeptFeatures(patches.slide_id, job.out)
        log.warning("%s: existing output is invalid (%s); recomputing", job.out, problem)
    attrs = _output_attrs(job, spec, record, params, runner)
    if patches.status != STATUS_OK:
        reason = str(patches.attrs.get("status_reason", "")) or "no patches"
        _write_flagged(job, patches, spec, attrs, patches.status, reason, params.dtype)
        return FlaggedPatches(job.slide, job.out, patches.status, reason)
    return extract_slide(job, patches, spec, runner.get(), params, attrs, no_progress)


def _output_attrs(
    job: SlideJob, spec: EncoderSpec, record: str, params: ExtractParams, runner: LazyRunner
) -> dict:
    """The provenance attributes of a slide's features file."""
    attrs = {
        "encoder": spec.name,
        "weights": record,
        "feature_dim": spec.feature_dim,
        "precision": params.precision,
        "device": str(runner.device),
        "dtype": params.dtype,
        "encoder_input_size": spec.input_size,
        "encoder_mpp": spec.mpp,
        "code_version": code_version(),
        "params": json.dumps({**asdict(params), "slide": str(job.slide)}, sort_keys=True),
    }
    if record == RANDOM_WEIGHTS:  # the features can be made again, bit for bit
        attrs["weights_seed"] = RANDOM_WEIGHTS_SEED
    return attrs


def _write_flagged(
    job: SlideJob,
    patches: Patches,
    spec: EncoderSpec,
    attrs: dict,
    status: str,
    reason: str,
    dtype: str,
) -> None:
    """An empty features file flagged `status`, which training reports and leaves out."""
    attrs = {**attrs, "status": status, "status_reason": reason}
    empty, no_rows = np.zeros((0, spec.feature_dim), np.float32), np.zeros(0, np.int64)
    no_coords = np.zeros((0, 2), np.int64)
    write_features(job.out, job.out_pt, empty, no_coords, no_rows, patches, attrs, dtype)


def record_failure(
    job: SlideJob,
    spec: EncoderSpec,
    record: str,
    params: ExtractParams,
    runner: LazyRunner,
    reason: str,
) -> Path | None:
    """--record-failed: a flagged empty output for a failed slide; the file written, or
    None when its patches file cannot be read (then nothing is)."""
    try:
        patches = read_patches(job.patches)
    except PipelineError:
        return None
    attrs = _output_attrs(job, spec, record, params, runner)
    _write_flagged(job, patches, spec, attrs, STATUS_FAILED, reason, params.dtype)
    return job.out


def extract_slide(
    job: SlideJob,
    patches: Patches,
    spec: EncoderSpec,
    runner: EncoderRunner,
    params: ExtractParams,
    attrs: dict,
    no_progress: bool,
) -> str:
    """Encode the patches of a slide and write its outputs; returns the summary line."""
    geometry = _slide_geometry(job.slide, patches, spec)
    dataset = PatchDataset(job.slide, patches.coords, geometry)
    result = extract_features(
        dataset,
        runner,
        spec.feature_dim,
        params.batch_size,
        params.workers,
        params.on_bad_patch,
        progress=not no_progress,
    )
    skipped, coords = result.skipped_indices, patches.coords[result.kept]
    _check_finite(job, spec, result, coords, attrs["weights"])
    _log_unreadable(job, patches, result)
    attrs.update(read_level=geometry.level, read_size=geometry.region_size)
    status, reason = unreadable_verdict(
        len(skipped), len(patches.coords), params.max_unreadable_fraction
    )
    attrs.update(
        status=status,
        status_reason=reason,
        unreadable_fraction=len(skipped) / len(patches.coords),
        max_unreadable_fraction=params.max_unreadable_fraction,
    )
    write_features(
        job.out, job.out_pt, result.features, coords, skipped, patches, attrs, params.dtype
    )
    rate = len(patches.coords) / max(result.seconds, 1e-9)
    log.info(
        "%s: %.1f patches/s (%s, %s, %d workers)",
        patches.slide_id,
        rate,
        runner.device,
        params.precision,
        params.workers,
    )
    return ExtractedFeatures(
        slide_id=patches.slide_id, slide=job.slide, n_patches=len(coords),
        feature_dim=spec.feature_dim, encoder=spec.name, precision=params.precision,
        device=str(runner.device), patches_per_second=rate, status=status, reason=reason,
        unreadable=len(skipped),
    )  # fmt: skip


def _check_finite(
    job: SlideJob, spec: EncoderSpec, result: Extraction, coords: np.ndarray, weights: str
) -> None:
    """NaN/Inf features mean broken weights or a numeric overflow: never written."""
    not_finite = np.flatnonzero(~np.isfinite(result.features).all(axis=1))
    if len(not_finite):
        x, y = coords[not_finite[0]]
        raise PipelineError(
            f"{job.slide}: encoder {spec.name} gave NaN/Inf features for {len(not_finite)} "
            f"patches (first at level-0 ({x}, {y})); check the weights ({weights})"
        )


def _log_unreadable(job: SlideJob, patches: Patches, result: Extraction) -> None:
    for row, message in result.errors.items():
        x, y = patches.coords[row]
        log.warning(
            "%s: skipped unreadable patch at level-0 (%d, %d) (%s)", job.slide, x, y, message
        )


def _slide_geometry(slide_path: Path, patches: Patches, spec: EncoderSpec) -> ReadGeometry:
    """Where to read: checked against the patches file so a wrong slide is caught, not encoded."""
    slide = open_slide(slide_path)
    try:
        expected = (patches.attrs.get("level0_width"), patches.attrs.get("level0_height"))
        if None not in expected and tuple(int(v) for v in expected) != slide.dimensions:
            raise SlideError(
                slide_path,
                f"level-0 size {slide.dimensions[0]}×{slide.dimensions[1]} differs from the "
                f"{expected[0]}×{expected[1]} of {patches.path}: not the slide it was patched from",
            )
        slide_mpp, target_mpp = patches.slide_mpp(), float(patches.attrs.get("target_mpp", 0))
        if target_mpp and abs(target_mpp - spec.mpp) / spec.mpp > 0.1:
            log.warning(
                "%s: patches are at %.3g µm/px, encoder %s expects %.3g",
                patches.path,
                target_mpp,
                spec.name,
                spec.mpp,
            )
        return read_geometry(
            slide, slide_mpp, patches.patch_size_level0(), spec.mpp, spec.input_size
        )
    finally:
        slide.close()
