"""The patching settings, each declared once: a field of :class:`PatchParams` (the grid) or
:class:`TissueParams` (the segmentation) with its default, and for those a user sets, its
option of ``python -m preprocessing.patch`` (help, how it is read) and its key in the
workflow config's ``preprocessing`` section, the field's name (:mod:`plumbing.settings`).
Standard library only: the workflow reads it when it plans the jobs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from plumbing.settings import BadValue, Bounded, option


def threshold(value: str) -> int | None:
    """``otsu`` (None) or a saturation 0–255."""
    if value == "otsu":
        return None
    try:
        number = int(value)
    except ValueError:
        raise BadValue(f"expected 'otsu' or an integer 0-255, got {value!r}") from None
    if not 0 <= number <= 255:
        raise BadValue(f"threshold must be in 0-255, got {number}")
    return number


#: A share from 0 to 1, both included.
FRACTION = Bounded(float, minimum=0, maximum=1)
#: A size or resolution: more than 0.
POSITIVE = Bounded(float, above=0)


@dataclass(frozen=True)
class TissueParams:
    """Segmentation settings. Defaults suit H&E at a segmentation resolution of ~8 µm/px."""

    #: µm/px of the image segmented (read from the pyramid, see slide.py)
    seg_mpp: float = field(
        default=8.0, metadata=option("µm/px at which tissue is segmented", parse=POSITIVE)
    )
    #: fixed saturation threshold (0–255); None = Otsu
    threshold: int | None = field(
        default=None,
        metadata=option("'otsu' (default) or saturation 0-255", parse=threshold),
    )
    min_saturation: int = 15  #: floor under Otsu, so a blank slide does not become all tissue
    median_um: float = 50.0  #: median blur window
    close_um: float = 50.0  #: morphological closing kernel
    #: smaller tissue pieces are dropped (0.02 mm²)
    min_tissue_area_um2: float = field(
        default=20_000.0, metadata=option("µm²", flag="--min-tissue-area", parse=float)
    )
    #: smaller holes are filled
    min_hole_area_um2: float = field(
        default=10_000.0, metadata=option("µm²", flag="--min-hole-area", parse=float)
    )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PatchParams:
    """The patch grid: its resolution, patch size, tissue share and overlap, and the
    segmentation it is laid on."""

    target_mpp: float = field(
        default=0.5,
        metadata=option("µm/px of the patches given to the encoder (0.5 ≈ 20×)", parse=POSITIVE),
    )
    patch_size: int = field(default=256, metadata=option("px at target mpp", parse=int))
    min_tissue: float = field(
        default=0.25,
        metadata=option("keep a patch when at least this fraction of it is tissue", parse=FRACTION),
    )
    overlap: float = field(
        default=0.0,
        metadata=option(
            "fraction of a patch shared with its neighbour (0 ≤ overlap < 1)", parse=FRACTION
        ),
    )
    tissue: TissueParams = field(default_factory=TissueParams)
