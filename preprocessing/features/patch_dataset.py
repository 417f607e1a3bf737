"""A slide's patches as encoder inputs: a torch Dataset read by DataLoader workers.

Each worker opens its own OpenSlide handle on its first item (handles are never pickled
or shared across processes). Items are uint8 images at the encoder's input size;
normalisation happens later, on the device, once per batch. A tile that cannot be read
does not raise inside the worker: the item comes back flagged, so the caller decides
between stopping with the patch's coordinate and skipping it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import openslide
import torch
from torch.utils.data import DataLoader, Dataset

from preprocessing.slides.access import best_level_for_mpp, open_slide, read_rgb


@dataclass(frozen=True)
class ReadGeometry:
    """How one patch is read: pyramid level, region side at that level, encoder input side."""

    level: int
    downsample: float  #: level-0 px per level px
    region_size: int  #: px at `level` covering the patch's level-0 footprint
    input_size: int  #: px the encoder takes

    @property
    def interpolation(self) -> int:
        # Area averaging when shrinking (no aliasing); linear when a coarse pyramid must enlarge.
        return cv2.INTER_AREA if self.region_size >= self.input_size else cv2.INTER_LINEAR


def read_geometry(
    slide: openslide.OpenSlide,
    slide_mpp: float,
    patch_size_level0: float,
    encoder_mpp: float,
    input_size: int,
) -> ReadGeometry:
    """Read at the coarsest level at least as fine as the encoder's µm/px (never upsampling
    from a coarser level), a region covering `patch_size_level0` level-0 px."""
    level = best_level_for_mpp(slide, slide_mpp, encoder_mpp)
    downsample = float(slide.level_downsamples[level])
    region = max(1, round(patch_size_level0 / downsample))
    return ReadGeometry(level, downsample, region, int(input_size))


class PatchItem(NamedTuple):
    image: torch.Tensor  #: (3, S, S) uint8; zeros when unreadable
    index: int  #: row in the coords array
    ok: bool
    error: str  #: OpenSlide's message when not ok


class PatchBatch(NamedTuple):
    images: torch.Tensor  #: (B, 3, S, S) uint8, channels-last memory
    indices: torch.Tensor  #: (B,) int64 rows of the coords array
    ok: torch.Tensor  #: (B,) bool
    errors: list[str]


class PatchDataset(Dataset):
    """Patches at level-0 top-left `coords` (N×2 x, y) of one slide, in coords order."""

    def __init__(self, slide_path: str | Path, coords: np.ndarray, geometry: ReadGeometry):
        self.slide_path = Path(slide_path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.geometry = geometry
        self._slide: openslide.OpenSlide | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_slide"] = None  # each process opens its own handle
        return state

    def _handle(self) -> openslide.OpenSlide:
        if self._slide is None:
            self._slide = open_slide(self.slide_path)
        return self._slide

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def read(self, index: int) -> np.ndarray:
        """(S, S, 3) uint8 RGB of patch `index`; raises OpenSlideError on a corrupt tile."""
        geometry = self.geometry
        x, y = (int(v) for v in self.coords[index])
        size = (geometry.region_size, geometry.region_size)
        region = read_rgb(self._handle(), (x, y), geometry.level, size)
        if geometry.region_size == geometry.input_size:
            return region
        side = (geometry.input_size, geometry.input_size)
        return cv2.resize(region, side, interpolation=geometry.interpolation)

    def __getitem__(self, index: int) -> PatchItem:
        try:
            rgb = self.read(index)
        except openslide.OpenSlideError as err:
            # OpenSlide's error state is sticky: this handle fails every later read too.
            self.close()
            side = self.geometry.input_size
            return PatchItem(
                torch.zeros((3, side, side), dtype=torch.uint8), index, False, str(err)
            )
        return PatchItem(torch.from_numpy(rgb).permute(2, 0, 1), index, True, "")


def collate_patches(items: list[PatchItem]) -> PatchBatch:
    """Stack items keeping channels-last memory (what the encoders run fastest on)."""
    images = torch.stack([item.image.permute(1, 2, 0) for item in items]).permute(0, 3, 1, 2)
    indices = torch.tensor([item.index for item in items], dtype=torch.int64)
    ok = torch.tensor([item.ok for item in items], dtype=torch.bool)
    return PatchBatch(images, indices, ok, [item.error for item in items])


def _init_worker(_: int) -> None:
    # Workers decode and resize; one thread each leaves the cores to the encoder.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def patch_loader(
    dataset: PatchDataset, batch_size: int, workers: int, pin_memory: bool = False
) -> DataLoader:
    """Batches in coords order (no shuffling; DataLoader keeps order across workers)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_patches,
        pin_memory=pin_memory,
        worker_init_fn=_init_worker if workers > 0 else None,
        prefetch_factor=max(2, math.ceil(4 / max(workers, 1))) if workers > 0 else None,
        persistent_workers=False,
    )


@contextlib.contextmanager
def _fork_safe_opencv() -> Iterator[None]:
    """OpenCV's pthread pool does not survive fork: a worker that inherits a live pool hangs
    on its first OpenCV call. Parking the pool while the workers fork avoids that."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


def iter_batches(loader: DataLoader) -> Iterator[PatchBatch]:
    """The loader's batches; its worker processes are started fork-safely."""
    with _fork_safe_opencv():
        batches = iter(loader)  # the workers start (fork) here
    yield from batches
