"""Patches through an encoder, fast: the device, the precision, and the inference loop.

The encoder sees uint8 batches normalised on the device, channels-last, under autocast;
on CUDA the copy of a batch's features back to the CPU overlaps the next batch, so the
GPU does not wait on Python. Eval-mode BatchNorm is folded into its convolution, which
makes CNN encoders markedly faster on CPUs. A patch whose tile cannot be read stops the
run or is left out and recorded, as the caller chooses.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.fx.experimental import optimization as fx_optimization
from tqdm import tqdm

from plumbing.errors import PipelineError, SlideError
from preprocessing.features.encoders import EncoderSpec
from preprocessing.features.patch_dataset import PatchDataset, iter_batches, patch_loader

log = logging.getLogger("hmil.extract")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise PipelineError(
            "--device cuda: no CUDA GPU is available to torch; use --device cpu or auto"
        )
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise PipelineError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return requested


def default_workers(device: torch.device) -> int:
    """CPU: one reader beside the encoder's threads. GPU: every CPU this process may use but
    one, up to 16: one reader supplies about 300 patches/s (`bench_features.py
    --reader-only`), a GPU takes thousands."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1 if device.type == "cpu" else max(1, min(16, (cpus or 2) - 1))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm into the preceding convolution (same function, fewer memory
    passes: CNN encoders run markedly faster on CPUs). Models without BatchNorm, or that
    torch.fx cannot trace, are returned unchanged."""
    if not any(type(m) is nn.BatchNorm2d for m in model.modules()):
        return model
    try:
        fused = fx_optimization.fuse(model)
    except Exception as err:  # tracing limits are model-specific; folding is only a speed-up
        log.debug("BatchNorm not folded (%s: %s)", type(err).__name__, err)
        return model
    if hasattr(model, "num_features"):
        fused.num_features = model.num_features
    return fused.eval()


@dataclass
class PendingFeatures:
    """Features on their way to the CPU: `result()` waits for the copy (if any)."""

    host: torch.Tensor
    done: torch.cuda.Event | None = None

    def result(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
        return self.host


class EncoderRunner:
    """uint8 batches → float32 features: normalise on the device, channels-last, autocast.

    With `compile`, the encoder is compiled once for `batch_size` (inductor, weights frozen
    as constants); smaller batches are padded to that size rather than recompiled.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: EncoderSpec,
        device: torch.device,
        precision: str = "fp32",
        compile: bool = False,
        batch_size: int = 64,
    ):
        self.device = device
        self.amp_dtype = PRECISIONS[precision]
        self.input_size = spec.input_size
        self.model = fold_batchnorm(model).to(device, memory_format=torch.channels_last)
        self.compiled_batch = batch_size if compile else None
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one input shape: pick the fastest kernels
        if compile:
            self.model = torch.compile(self.model, dynamic=False, options={"freezing": True})
        # (x / 255 - mean) / std as one multiply-add on the device.
        std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std

    @torch.inference_mode()
    def submit(self, images: torch.Tensor) -> PendingFeatures:
        """Queue (B, 3, S, S) uint8 images; their (B, D) float32 features come back on the CPU
        from `.result()`. On CUDA the copy back is asynchronous, so the caller can queue the
        next batch before waiting: the GPU never idles while Python fetches a batch."""
        count = len(images)
        if self.compiled_batch and count < self.compiled_batch:
            padding = images.new_zeros((self.compiled_batch - count, *images.shape[1:]))
            images = torch.cat([images, padding])
        x = images.to(self.device, non_blocking=True).float()
        x = torch.addcmul(self.shift, x, self.scale).contiguous(memory_format=torch.channels_last)
        enabled = self.amp_dtype is not None
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=enabled
        ):
            features = self.model(x)[:count].float()
        if self.device.type != "cuda":
            return PendingFeatures(features.cpu())
        host = torch.empty(features.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(features, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingFeatures(host, done)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 → (B, D) float32 on the CPU, synchronously."""
        return self.submit(images).result()

    def warm_up(self) -> float:
        """Run one batch of zeros (compiles a compiled encoder); returns the seconds it took."""
        start = time.perf_counter()
        side = self.input_size
        self(torch.zeros((self.compiled_batch or 1, 3, side, side), dtype=torch.uint8))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


@dataclass
class Extraction:
    features: np.ndarray  #: (K, D) float32 of the readable patches, in coords order
    kept: np.ndarray  #: (N,) bool: the patch's row is in `features`
    errors: dict[int, str]  #: coords row → OpenSlide message, for skipped patches
    seconds: float

    @property
    def skipped_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.kept)


def extract_features(
    dataset: PatchDataset,
    runner: EncoderRunner,
    feature_dim: int,
    batch_size: int = 64,
    workers: int = 0,
    on_bad_patch: str = "fail",
    progress: bool = True,
) -> Extraction:
    """Run every patch of `dataset` through `runner`; rows follow the dataset's coords order.

    A patch whose tile cannot be read stops the run (`fail`, a `SlideError` naming its
    level-0 coordinate) or is left out and recorded (`skip`).
    """
    count = len(dataset)
    features = np.zeros((count, feature_dim), np.float32)
    kept = np.ones(count, bool)
    errors: dict[int, str] = {}
    loader = patch_loader(dataset, batch_size, workers, pin_memory=runner.device.type == "cuda")
    start = time.perf_counter()
    bar = tqdm(
        iter_batches(loader),
        total=len(loader),
        desc=dataset.slide_path.name,
        unit="batch",
        disable=not progress,
    )
    pending: tuple[np.ndarray, PendingFeatures] | None = None  # one batch in flight
    for batch in bar:
        images, rows = batch.images, batch.indices.numpy()
        if not batch.ok.all():
            bad = np.flatnonzero(~batch.ok.numpy())
            if on_bad_patch == "fail":
                x, y = dataset.coords[rows[bad[0]]]
                raise SlideError(
                    dataset.slide_path,
                    f"tile data cannot be read for the patch at level-0 ({x}, {y}), level "
                    f"{dataset.geometry.level} ({batch.errors[bad[0]]}); "
                    "--on-bad-patch skip leaves such patches out",
                )
            for position in bad:
                errors[int(rows[position])] = batch.errors[position]
            kept[rows[bad]] = False
            images, rows = images[batch.ok], rows[batch.ok.numpy()]
        if len(rows):
            queued = (rows, runner.submit(images))
            if pending is not None:
                features[pending[0]] = pending[1].result().numpy()
            pending = queued
    if pending is not None:
        features[pending[0]] = pending[1].result().numpy()
    dataset.close()
    seconds = time.perf_counter() - start
    return Extraction(features[kept], kept, errors, seconds)
