"""Where another tool left a slide's features: the layouts an import recognises.

Layouts, detected per slide in this order (h5 first: only h5 files carry coordinates):

- ``h5_files/<id>.h5`` (CLAM): ``features`` N×D, ``coords`` N×2. CLAM writes no attributes
  there; the patch geometry is on the coords of CLAM's patches file, looked for in
  ``--patches-dir`` or ``<source>/patches/<id>.h5`` (``patch_size``, ``patch_level``,
  ``downsample``);
- ``features_<encoder>/<id>.h5`` (TRIDENT): coords attributes ``patch_size``,
  ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
  ``level0_width``, ``level0_height``; features attribute ``encoder``;
- ``<id>.h5``: either of the above given as the folder itself (e.g. TRIDENT's
  ``features_uni_v1``), told apart by those attributes;
- ``pt_files/<id>.pt`` (CLAM), ``features_<encoder>/<id>.pt`` (TRIDENT ``--saveas pt``) and
  ``<id>.pt`` (the HMIL reference layout): an N×D tensor, no coordinates, so no heatmaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from plumbing.errors import PipelineError


class FeatureImportError(PipelineError):
    """The source folder as a whole cannot be imported (the CLI prints one line)."""


@dataclass(frozen=True)
class SourceFile:
    """One slide's features in the source folder; layout names where it was found."""

    slide_id: str
    path: Path
    layout: str

    @property
    def is_h5(self) -> bool:
        return self.path.suffix == ".h5"


def candidate_paths(source_dir: Path, encoder: str, slide_id: str) -> list[tuple[Path, str]]:
    """Where a slide's features may be, in the order they are preferred, with the layout."""
    trident = source_dir / f"features_{encoder}"
    return [
        (source_dir / "h5_files" / f"{slide_id}.h5", "clam"),
        (trident / f"{slide_id}.h5", "trident"),
        (source_dir / f"{slide_id}.h5", "h5"),
        (source_dir / "pt_files" / f"{slide_id}.pt", "clam_pt"),
        (trident / f"{slide_id}.pt", "trident_pt"),
        (source_dir / f"{slide_id}.pt", "pt"),
    ]


def looked_for(source_dir: Path, encoder: str, slide_id: str) -> str:
    """The candidate paths of a slide, relative to the folder, for error messages."""
    paths = candidate_paths(source_dir, encoder, slide_id)
    return ", ".join(str(path.relative_to(source_dir)) for path, _ in paths)


def locate_source(source_dir: str | Path, encoder: str, slide_id: str) -> SourceFile | None:
    """The preferred features file of a slide in `source_dir`, or None when there is none."""
    for path, layout in candidate_paths(Path(source_dir), encoder, slide_id):
        if path.is_file():
            return SourceFile(slide_id, path, layout)
    return None


def locate_cohort(
    source_dir: str | Path, encoder: str, slide_ids: list[str]
) -> dict[str, SourceFile | None]:
    """Each slide's source file (None where missing); FeatureImportError when the folder is
    missing or holds none of the slides, the one mistake that would fail every slide."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FeatureImportError(f"{source_dir}: features folder not found")
    found = {slide_id: locate_source(source_dir, encoder, slide_id) for slide_id in slide_ids}
    if slide_ids and not any(found.values()):
        looked = looked_for(source_dir, encoder, "<slide_id>")
        raise FeatureImportError(
            f"{source_dir}: none of the sheet's {len(slide_ids)} slides found (looked for "
            f"{looked}); wrong folder, encoder name or slide ids?"
        )
    return found
