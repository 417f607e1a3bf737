"""Segment a slide's tissue and write its patch grid (`python -m preprocessing.patch`).

Outputs: the patches h5 (CLAM-compatible `coords` plus provenance attributes), and
optionally the QC PNG and the tissue GeoJSON. A slide without tissue gives an empty,
flagged patches file. With `--on-error record` an unreadable slide also gives a flagged
file (status `failed`) instead of a non-zero exit, so one bad slide never stops a cohort.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from plumbing.atomic import atomic_outputs, buffered
from plumbing.cli import run_cli, setup_logging
from plumbing.errors import PipelineError, SlideError
from plumbing.provenance import code_version
from preprocessing.slides.access import (
    Mpp,
    best_level_for_mpp,
    open_slide,
    read_at_mpp,
    resolve_mpp,
)
from preprocessing.slides.grid import PatchGrid, patch_grid
from preprocessing.slides.qc import qc_mpp, render_failure, render_qc, write_png
from preprocessing.slides.tissue import (
    TissueParams,
    TissueSegmentation,
    polygons_to_geojson,
    scale_polygons,
    segment_tissue,
)

log = logging.getLogger("hmil.patch")

STATUS_OK, STATUS_EMPTY, STATUS_FAILED = "ok", "empty", "failed"


@dataclass(frozen=True)
class PatchParams:
    target_mpp: float = 0.5
    patch_size: int = 256
    min_tissue: float = 0.25
    overlap: float = 0.0
    tissue: TissueParams = field(default_factory=TissueParams)


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


def write_patches_h5(path: Path, coords: np.ndarray, fractions: np.ndarray, attrs: dict) -> None:
    with buffered(path) as buffer, h5py.File(buffer, "w") as h5:
        dataset = h5.create_dataset("coords", data=coords.astype(np.int64).reshape(-1, 2))
        h5.create_dataset("tissue_fraction", data=fractions.astype(np.float32))
        # CLAM reads the attributes from `coords`; our tools read the file's root.
        for target in (dataset.attrs, h5.attrs):
            for key, value in attrs.items():
                target[key] = value


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


def _threshold(value: str) -> int | None:
    if value == "otsu":
        return None
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'otsu' or an integer 0-255, got {value!r}"
        ) from None
    if not 0 <= number <= 255:
        raise argparse.ArgumentTypeError(f"threshold must be in 0-255, got {number}")
    return number


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {value}")
    return number


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    defaults, tissue = PatchParams(), TissueParams()
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing.patch",
        description="Segment tissue and write the patch grid of one slide.",
    )
    parser.add_argument("slide", type=Path, help="slide file (any format OpenSlide reads)")
    parser.add_argument("--out", type=Path, required=True, help="patches h5 to write")
    parser.add_argument("--qc", type=Path, help="QC PNG: thumbnail, tissue outlines, patch grid")
    parser.add_argument("--geojson", type=Path, help="tissue polygons, level-0 px (QuPath)")
    parser.add_argument("--slide-id", help="id recorded in the outputs (default: file stem)")
    parser.add_argument("--mpp", type=_positive, help="level-0 µm/px; overrides the metadata")
    parser.add_argument(
        "--target-mpp", type=_positive, default=defaults.target_mpp,
        help="µm/px of the patches given to the encoder (0.5 ≈ 20×)",
    )  # fmt: skip
    parser.add_argument(
        "--patch-size", type=int, default=defaults.patch_size, help="px at target mpp"
    )
    parser.add_argument(
        "--min-tissue", type=_fraction, default=defaults.min_tissue,
        help="keep a patch when at least this fraction of it is tissue",
    )  # fmt: skip
    parser.add_argument(
        "--overlap", type=_fraction, default=defaults.overlap,
        help="fraction of a patch shared with its neighbour (0 ≤ overlap < 1)",
    )  # fmt: skip
    parser.add_argument(
        "--seg-mpp", type=_positive, default=tissue.seg_mpp,
        help="µm/px at which tissue is segmented",
    )  # fmt: skip
    parser.add_argument(
        "--threshold", type=_threshold, default=None, help="'otsu' (default) or saturation 0-255"
    )
    parser.add_argument(
        "--min-tissue-area", type=float, default=tissue.min_tissue_area_um2, help="µm²"
    )
    parser.add_argument("--min-hole-area", type=float, default=tissue.min_hole_area_um2, help="µm²")
    parser.add_argument(
        "--on-error",
        choices=("fail", "record"),
        default="fail",
        help="fail: exit 1 on a bad slide (default); record: write flagged outputs and exit 0",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.patch_size < 1:
        raise PipelineError(f"--patch-size must be positive, got {args.patch_size}")
    if args.overlap >= 1:
        raise PipelineError("--overlap must be below 1")
    params = PatchParams(
        target_mpp=args.target_mpp,
        patch_size=args.patch_size,
        min_tissue=args.min_tissue,
        overlap=args.overlap,
        tissue=TissueParams(
            seg_mpp=args.seg_mpp,
            threshold=args.threshold,
            min_tissue_area_um2=args.min_tissue_area,
            min_hole_area_um2=args.min_hole_area,
        ),
    )
    slide_id = args.slide_id or args.slide.stem
    try:
        result = patch_slide(args.slide, params, args.mpp, slide_id, qc=args.qc is not None)
    except SlideError as err:
        if args.on_error == "fail":
            raise
        write_failure(err, slide_id, params, args.out, args.qc, args.geojson)
        print(f"warning: {err} (recorded as failed in {args.out})")
        return 0
    write_outputs(result, params, args.out, args.qc, args.geojson)
    line = (
        f"{slide_id}: {len(result.grid.coords)} patches, tissue {result.tissue_area_mm2:.2f} mm², "
        f"mpp {result.mpp.value:.4g} ({result.mpp.source}), {result.seconds:.2f} s"
    )
    if result.status == STATUS_EMPTY:
        line = f"warning: {args.slide}: 0 patches ({result.status_reason}); {line}"
    print(line)
    return 0


if __name__ == "__main__":
    run_cli(main)
