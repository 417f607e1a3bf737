"""Patching one slide: segment its tissue, lay the patch grid, write the outputs.

The outputs are the patches h5 (:mod:`~preprocessing.slides.patch_files`) and, optionally,
the QC PNG and the tissue GeoJSON, written together so that a crash leaves none of them.
A slide that cannot be read can instead be recorded as failed (`write_failure`), so that
one bad slide never stops a cohort.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from plumbing.atomic import atomic_outputs
from plumbing.errors import SlideError
from plumbing.provenance import code_version
from preprocessing.slides.access import (
    Mpp,
    best_level_for_mpp,
    open_slide,
    read_at_mpp,
    resolve_mpp,
)
from preprocessing.slides.grid import PatchGrid, patch_grid
from preprocessing.slides.params import PatchParams
from preprocessing.slides.patch_files import (
    STATUS_EMPTY,
    STATUS_FAILED,
    STATUS_OK,
    write_patches_h5,
)
from preprocessing.slides.qc import qc_mpp, render_failure, render_qc, write_png
from preprocessing.slides.tissue import (
    TissueSegmentation,
    polygons_to_geojson,
    scale_polygons,
    segment_tissue,
)


@dataclass
class SlidePatches:
    """Everything patching learned about one slide; written by `write_patches_h5`."""

    slide_id: str
    slide_path: str
    mpp: Mpp
    level0_size: tuple[int, int]
    grid: PatchGrid
    segmentation: TissueSegmentation
    thumbnail: np.ndarray  #: RGB image that was segmented
    qc_thumbnail: np.ndarray | None  #: sharper RGB image for the QC picture of small slides
    seg_level: int
    patch_level: int
    patch_downsample: float
    patch_level_size: tuple[int, int]
    seconds: float

    @property
    def mask_pixel_level0(self) -> tuple[float, float]:
        """Level-0 size (x, y) of one segmentation-mask pixel."""
        mask = self.segmentation.mask
        return self.level0_size[0] / mask.shape[1], self.level0_size[1] / mask.shape[0]

    @property
    def polygons_level0(self) -> list[list[np.ndarray]]:
        return scale_polygons(self.segmentation.polygons, self.mask_pixel_level0)

    @property
    def tissue_area_mm2(self) -> float:
        pixel_x, pixel_y = self.mask_pixel_level0
        return float(self.segmentation.mask.sum()) * pixel_x * pixel_y * self.mpp.value**2 / 1e6

    @property
    def status(self) -> str:
        return STATUS_OK if len(self.grid.coords) else STATUS_EMPTY

    @property
    def status_reason(self) -> str:
        if len(self.grid.coords):
            return ""
        if not self.segmentation.mask.any():
            return "no tissue found"
        if self.grid.candidates == 0:
            return "slide is smaller than one patch"
        return "no patch reaches the minimum tissue fraction"


def patch_slide(
    path: str | Path,
    params: PatchParams,
    mpp_override: float | None = None,
    slide_id: str | None = None,
    qc: bool = False,
) -> SlidePatches:
    """Open, segment and grid one slide. Raises `SlideError` for unusable slides.

    With `qc`, small slides (whose segmentation image is tiny) are read once more at a
    finer resolution so the QC picture is legible; large slides reuse the segmented image.
    """
    start = time.perf_counter()
    slide = open_slide(path)
    try:
        mpp = resolve_mpp(slide.properties, path, mpp_override)
        seg_mpp = max(params.tissue.seg_mpp, mpp.value)
        thumbnail, seg_level = read_at_mpp(slide, mpp.value, seg_mpp, path)
        level0_size = slide.dimensions
        # The thumbnail's true µm/px (its size was rounded from the level-0 size).
        thumb_mpp = mpp.value * level0_size[0] / thumbnail.shape[1]
        segmentation = segment_tissue(thumbnail, thumb_mpp, params.tissue)
        grid = patch_grid(
            segmentation.mask,
            level0_size,
            mpp.value,
            target_mpp=params.target_mpp,
            patch_size=params.patch_size,
            overlap=params.overlap,
            min_tissue=params.min_tissue,
        )
        patch_level = best_level_for_mpp(slide, mpp.value, params.target_mpp)
        qc_thumbnail = None
        if qc:
            wanted_mpp = qc_mpp(level0_size, mpp.value)
            if wanted_mpp < 0.75 * thumb_mpp:
                qc_thumbnail = read_at_mpp(slide, mpp.value, wanted_mpp, path)[0]
        return SlidePatches(
            slide_id=slide_id or Path(path).stem,
            slide_path=str(path),
            mpp=mpp,
            level0_size=level0_size,
            grid=grid,
            segmentation=segmentation,
            thumbnail=thumbnail,
            qc_thumbnail=qc_thumbnail,
            seg_level=seg_level,
            patch_level=patch_level,
            patch_downsample=float(slide.level_downsamples[patch_level]),
            patch_level_size=slide.level_dimensions[patch_level],
            seconds=time.perf_counter() - start,
        )
    finally:
        slide.close()


def patch_attributes(result: SlidePatches, params: PatchParams) -> dict:
    """Attributes of the patches h5: CLAM's names plus what downstream steps and people need."""
    grid = result.grid
    return {
        # CLAM's names (on the `coords` dataset, where CLAM reads them)
        "patch_size": params.patch_size,
        "patch_level": result.patch_level,
        "downsample": np.array([result.patch_downsample, result.patch_downsample]),
        "level_dim": np.array(result.patch_level_size, dtype=np.int64),
        # Physical grid and provenance
        "patch_size_level0": round(grid.patch_size_level0),
        "patch_size_level0_exact": grid.patch_size_level0,
        "step_level0": grid.step_level0,
        "target_mpp": params.target_mpp,
        "slide_mpp": result.mpp.value,
        "mpp_source": result.mpp.source,
        "min_tissue": params.min_tissue,
        "overlap": params.overlap,
        "level0_width": result.level0_size[0],
        "level0_height": result.level0_size[1],
        "seg_level": result.seg_level,
        "seg_threshold": result.segmentation.threshold,
        "slide_id": result.slide_id,
        "slide_path": result.slide_path,
        "n_patches": len(grid.coords),
        "tissue_area_mm2": result.tissue_area_mm2,
        "status": result.status,
        "status_reason": result.status_reason,
        "code_version": code_version(),
        "params": json.dumps(_params_dict(params), sort_keys=True),
    }


def _params_dict(params: PatchParams) -> dict:
    return asdict(params)


def write_outputs(
    result: SlidePatches, params: PatchParams, out: Path, qc: Path | None, geojson: Path | None
) -> None:
    attrs = patch_attributes(result, params)
    polygons = result.polygons_level0
    with atomic_outputs(qc, geojson, out) as (qc_tmp, geojson_tmp, out_tmp):
        if qc_tmp is not None:
            caption = [
                f"{result.slide_id}   {result.level0_size[0]} x {result.level0_size[1]} px   "
                f"mpp {result.mpp.value:.4g} ({result.mpp.source})",
                f"{attrs['n_patches']} patches of {params.patch_size} px"
                f" at {params.target_mpp} um/px (min tissue {params.min_tissue:.0%})"
                f"   tissue {attrs['tissue_area_mm2']:.2f} mm2"
                + (f"   [{result.status_reason}]" if result.status_reason else ""),
            ]
            image = render_qc(
                result.qc_thumbnail if result.qc_thumbnail is not None else result.thumbnail,
                polygons,
                result.grid.coords,
                result.grid.patch_size_level0,
                result.level0_size,
                caption,
            )
            write_png(qc_tmp, image)
        if geojson_tmp is not None:
            collection = polygons_to_geojson(polygons, {"slide_id": result.slide_id})
            geojson_tmp.write_text(json.dumps(collection))
        write_patches_h5(out_tmp, result.grid.coords, result.grid.tissue_fraction, attrs)


def write_failure(
    error: SlideError,
    slide_id: str,
    params: PatchParams,
    out: Path,
    qc: Path | None,
    geojson: Path | None,
) -> None:
    """Flagged outputs for a slide that cannot be processed (non-strict cohort runs)."""
    attrs = {
        "slide_id": slide_id,
        "slide_path": error.path,
        "status": STATUS_FAILED,
        "status_reason": error.problem,
        "n_patches": 0,
        "patch_size": params.patch_size,
        "target_mpp": params.target_mpp,
        "min_tissue": params.min_tissue,
        "code_version": code_version(),
        "params": json.dumps(_params_dict(params), sort_keys=True),
    }
    with atomic_outputs(qc, geojson, out) as (qc_tmp, geojson_tmp, out_tmp):
        if qc_tmp is not None:
            write_png(qc_tmp, render_failure(slide_id, error.problem))
        if geojson_tmp is not None:
            geojson_tmp.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
        write_patches_h5(out_tmp, np.zeros((0, 2), np.int64), np.zeros(0, np.float32), attrs)


@dataclass(frozen=True)
class PatchJob:
    """One slide to patch and where its outputs go."""

    slide: Path
    slide_id: str
    out: Path
    qc: Path | None = None
    geojson: Path | None = None
    mpp: float | None = None  #: level-0 µm/px that overrides the slide's metadata
    record_failure: bool = False  #: an unusable slide gives flagged outputs, not an error


@dataclass(frozen=True)
class PatchOutcome:
    """What patching one slide gave: its patches, tissue area, mpp and time, or, when the
    slide could not be processed (``failure``), the failure recorded in its outputs.
    ``empty_reason`` says why a processed slide has no patches."""

    job: PatchJob
    n_patches: int = 0
    tissue_area_mm2: float = 0.0
    mpp: float = 0.0
    mpp_source: str = ""
    seconds: float = 0.0
    empty_reason: str | None = None
    failure: SlideError | None = None

    @property
    def is_warning(self) -> bool:
        return self.failure is not None or self.empty_reason is not None

    def words(self) -> str:
        """The summary line of the slide (``warning: ...`` for a failure or no patches)."""
        job = self.job
        if self.failure is not None:
            return f"warning: {self.failure} (recorded as failed in {job.out})"
        line = (
            f"{job.slide_id}: {self.n_patches} patches, tissue {self.tissue_area_mm2:.2f} mm², "
            f"mpp {self.mpp:.4g} ({self.mpp_source}), {self.seconds:.2f} s"
        )
        if self.empty_reason is not None:
            line = f"warning: {job.slide}: 0 patches ({self.empty_reason}); {line}"
        return line


def patch_job(job: PatchJob, params: PatchParams) -> PatchOutcome:
    """Patch one slide and write its outputs; returns what it gave."""
    try:
        result = patch_slide(job.slide, params, job.mpp, job.slide_id, qc=job.qc is not None)
    except SlideError as err:
        if not job.record_failure:
            raise
        write_failure(err, job.slide_id, params, job.out, job.qc, job.geojson)
        return PatchOutcome(job, failure=err)
    write_outputs(result, params, job.out, job.qc, job.geojson)
    return PatchOutcome(
        job,
        n_patches=len(result.grid.coords),
        tissue_area_mm2=result.tissue_area_mm2,
        mpp=result.mpp.value,
        mpp_source=result.mpp.source,
        seconds=result.seconds,
        empty_reason=result.status_reason if result.status == STATUS_EMPTY else None,
    )
