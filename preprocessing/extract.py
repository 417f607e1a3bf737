"""Encode a slide's patches into features (`python -m preprocessing.extract`).

Reads the patches h5 of `preprocessing.patch`, runs the patches through a registered
encoder (`preprocessing.features.encoders`) and writes the features h5 plus a per-slide `.pt`
tensor, together and atomically. The features h5 holds `features` (N×D, float32 by
default: exact and what MIL training reads; `--dtype float16` halves the disk size) and
`coords` (N×2 int64, the patches' order), the patching attributes and the provenance.

A valid existing output is kept (checked with `validate_features`); an invalid one is
rebuilt with a log line saying why. Flagged patches files (no tissue, failed slide) give
an empty, flagged features file and exit 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.fx.experimental import optimization as fx_optimization
from tqdm import tqdm

from plumbing.atomic import atomic_outputs, buffered
from plumbing.cli import non_negative_int, run_cli, setup_logging
from plumbing.errors import OutputError, PipelineError, SlideError
from plumbing.provenance import code_version
from preprocessing.features.encoders import (
    RANDOM_WEIGHTS,
    RANDOM_WEIGHTS_SEED,
    EncoderError,
    EncoderSpec,
    build_encoder,
    get_encoder_spec,
    weights_record,
)
from preprocessing.features.patch_dataset import (
    PatchDataset,
    ReadGeometry,
    iter_batches,
    patch_loader,
    read_geometry,
)
from preprocessing.slides.access import open_slide
from preprocessing.slides.patch_files import STATUS_FAILED, STATUS_OK, Patches, plain, read_patches
from preprocessing.slides.sheet import read_slide_sheet

log = logging.getLogger("hmil.extract")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = ("float32", "float16")
#: A slide with more of its patches unreadable than this is failed, not just degraded.
DEFAULT_MAX_UNREADABLE_FRACTION = 0.1
#: Attributes the features file sets itself; the patches file's values are kept as `patches_<key>`.
_OWN_ATTRIBUTES = ("status", "status_reason", "n_patches", "code_version", "params")


# --- inference -------------------------------------------------------------------------------


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


# --- outputs ---------------------------------------------------------------------------------


def default_pt_path(out: Path) -> Path:
    return out.with_suffix(".pt")


def write_features(
    out: Path,
    out_pt: Path | None,
    features: np.ndarray,
    coords: np.ndarray,
    skipped: np.ndarray,
    patches: Patches,
    attrs: dict,
    dtype: str,
) -> None:
    """Features h5 (+ `.pt` float32 tensor) written together: both appear or neither does."""
    merged = {}
    for key, value in patches.attrs.items():
        merged[f"patches_{key}" if key in _OWN_ATTRIBUTES else key] = value
    merged.update(attrs)
    merged["n_patches"] = len(features)
    merged["n_skipped"] = len(skipped)
    largest = float(np.abs(features).max(initial=0.0))
    if dtype == "float16" and largest > np.finfo(np.float16).max:
        raise PipelineError(
            f"{out}: features reach {largest:.3g}, beyond float16; use --dtype float32"
        )
    with atomic_outputs(out, out_pt) as (out_tmp, pt_tmp):
        with buffered(out_tmp) as buffer, h5py.File(buffer, "w") as h5:
            _checksummed_dataset(h5, "features", features.astype(dtype, copy=False))
            _checksummed_dataset(h5, "coords", coords.astype(np.int64).reshape(-1, 2))
            h5.create_dataset("skipped_indices", data=skipped.astype(np.int64))
            h5.create_dataset("skipped_coords", data=patches.coords[skipped].reshape(-1, 2))
            for key, value in merged.items():
                h5.attrs[key] = value
        if pt_tmp is not None:
            with buffered(pt_tmp) as buffer:
                torch.save(torch.from_numpy(np.ascontiguousarray(features, np.float32)), buffer)


def _checksummed_dataset(h5: h5py.File, name: str, data: np.ndarray) -> None:
    """A dataset in chunks of about 1 MiB with a Fletcher-32 checksum each, so that bytes
    damaged on disk give a read error instead of silently wrong features."""
    if data.size == 0:
        h5.create_dataset(name, data=data)
        return
    row_bytes = data.itemsize * int(np.prod(data.shape[1:]))
    rows = int(np.clip(2**20 // max(row_bytes, 1), 1, len(data)))
    h5.create_dataset(name, data=data, chunks=(rows, *data.shape[1:]), fletcher32=True)


def validate_features(
    path: str | Path,
    patches_path: str | Path | None = None,
    encoder: str | None = None,
    weights: str | None = None,
    dtype: str | None = None,
    pt_path: str | Path | None = None,
) -> str | None:
    """Why the features file at `path` is not a complete, consistent output, or None if it is.

    Checks: readable h5, `features` N×D with D == `feature_dim`, `coords` N×2, every value
    finite; optionally the patches file (same coords in the same order, skipped rows
    accounted for), the encoder name, weights record, dtype and the `.pt` twin.
    """
    path = Path(path)
    if not path.is_file():
        return "file not found"
    try:
        with h5py.File(path, "r") as h5:
            for name in ("features", "coords"):
                if name not in h5:
                    return f"no `{name}` dataset"
            shape, coords = h5["features"].shape, h5["coords"][:]
            attrs = {key: plain(value) for key, value in h5.attrs.items()}
            file_dtype = str(h5["features"].dtype)
            skipped = h5["skipped_indices"][:] if "skipped_indices" in h5 else np.zeros(0, int)
            if len(shape) != 2:
                return f"features has shape {shape}, expected N×D"
            for start in range(0, shape[0], 65536):  # bounded memory on huge slides
                if not np.isfinite(h5["features"][start : start + 65536]).all():
                    return "features hold NaN or Inf values"
    except OSError as err:  # truncated, or a chunk fails its checksum
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"not a readable HDF5 file, damaged or incomplete ({first_line})"
    for key in ("encoder", "weights", "feature_dim"):
        if key not in attrs:
            return f"no `{key}` attribute"
    if shape[1] != int(attrs["feature_dim"]):
        return f"features are {shape[1]}-d but feature_dim says {attrs['feature_dim']}"
    if coords.shape != (shape[0], 2):
        return f"coords {coords.shape} do not match features {shape}"
    if encoder is not None and attrs["encoder"] != encoder:
        return f"made by encoder {attrs['encoder']}, not {encoder}"
    if weights is not None and attrs["weights"] != weights:
        return f"made with weights {attrs['weights']}, not {weights}"
    if dtype is not None and file_dtype != dtype:
        return f"features are {file_dtype}, not {dtype}"
    if encoder is not None:
        try:
            spec = get_encoder_spec(encoder)
        except PipelineError as err:
            return str(err)
        if shape[1] != spec.feature_dim:
            return f"features are {shape[1]}-d, encoder {encoder} gives {spec.feature_dim}"
    if patches_path is not None:
        try:
            patches = read_patches(patches_path)
        except PipelineError as err:
            return str(err)
        if patches.status != STATUS_OK:
            if shape[0]:
                return f"patches file is flagged {patches.status} but features hold rows"
        else:
            if len(coords) + len(skipped) != len(patches.coords):
                return (
                    f"{len(coords)} feature rows + {len(skipped)} skipped != "
                    f"{len(patches.coords)} patches in {patches.path}"
                )
            if not np.array_equal(np.delete(patches.coords, skipped, axis=0), coords):
                return f"coords differ from those of {patches.path}"
    if pt_path is not None:
        return _validate_pt(Path(pt_path), shape)
    return None


def _validate_pt(path: Path, shape: tuple[int, ...]) -> str | None:
    if not path.is_file():
        return f"{path.name} not found"
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle errors: all mean "rebuild"
        return f"{path.name} is not readable ({type(err).__name__})"
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(shape):
        return f"{path.name} does not hold a {shape[0]}×{shape[1]} tensor"
    return None


# --- command line ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractParams:
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


def default_workers(device: torch.device) -> int:
    """CPU: one reader beside the encoder's threads. GPU: every CPU this process may use but
    one, up to 16: one reader supplies about 300 patches/s (`bench_features.py
    --reader-only`), a GPU takes thousands."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1 if device.type == "cpu" else max(1, min(16, (cpus or 2) - 1))


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing.extract",
        description="Encode the patches of one slide, or of every slide of a sheet with the "
        "model loaded once, into features h5 (+ .pt tensor) files.",
        epilog="One slide: SLIDE PATCHES --out F.h5. A cohort: --sheet slides.csv "
        "--patches-dir DIR --out-dir DIR (files <slide_id>.h5/.pt; a slide that fails is "
        "listed in <out-dir>/failed_slides.csv and the others go on, unless --strict).",
    )
    parser.add_argument("slide", type=Path, nargs="?", help="slide file (any OpenSlide format)")
    parser.add_argument("patches", type=Path, nargs="?", help="patches h5 of preprocessing.patch")
    parser.add_argument("--encoder", required=True, help="registered name or timm:<model>")
    parser.add_argument("--out", type=Path, help="features h5 to write (one slide)")
    cohort = parser.add_argument_group("a cohort in one process")
    cohort.add_argument("--sheet", type=Path, help="slide sheet CSV (slide_id, path, ...)")
    cohort.add_argument("--patches-dir", type=Path, help="folder of <slide_id>.h5 patches files")
    cohort.add_argument("--out-dir", type=Path, help="folder for <slide_id>.h5/.pt features")
    cohort.add_argument("--strict", action="store_true", help="stop at the first slide that fails")
    cohort.add_argument(
        "--slide-ids", nargs="+", help="encode only these slides of the sheet (a workflow shard)"
    )
    cohort.add_argument(
        "--record-failed",
        action="store_true",
        help="write an empty features file flagged failed (with the reason) for a slide that "
        "fails, as for a slide whose patching failed, so that every output exists (a re-run "
        "tries such a slide again)",
    )
    cohort.add_argument(
        "--failed-list",
        type=Path,
        help="CSV of the slides that failed (default: <out-dir>/failed_slides.csv)",
    )
    parser.add_argument(
        "--weights", help="checkpoint file, or 'random' (tests only); default: download"
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=64, help="patches per forward pass"
    )
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        help="reader processes (default: 1 on CPU; on GPU all CPUs but one, up to 16)",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="auto: CUDA when present; cuda is an error where there is none",
    )  # fmt: skip
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: bf16 autocast on CUDA, fp32 on CPU",
    )
    parser.add_argument("--dtype", choices=DTYPES, help="stored feature type (default float32)")
    parser.add_argument(
        "--on-bad-patch",
        choices=("fail", "skip"),
        default="fail",
        help="unreadable tile: fail (default) or leave the patch out and record it",
    )
    parser.add_argument(
        "--max-unreadable-fraction",
        type=_fraction,
        default=DEFAULT_MAX_UNREADABLE_FRACTION,
        help="with --on-bad-patch skip: a slide with more of its patches unreadable is "
        f"recorded as failed (default {DEFAULT_MAX_UNREADABLE_FRACTION})",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument(
        "--check", action="store_true", help="only validate existing outputs; exit 1 if invalid"
    )
    out_pt = parser.add_mutually_exclusive_group()
    out_pt.add_argument("--out-pt", type=Path, help="N×D float32 tensor (default: --out with .pt)")
    out_pt.add_argument("--no-pt", action="store_true", help="write no .pt tensor")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


@dataclass(frozen=True)
class SlideJob:
    """One slide's inputs and outputs."""

    slide_id: str
    slide: Path
    patches: Path
    out: Path
    out_pt: Path | None


def slide_jobs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[SlideJob]:
    """The slides to encode: the one given on the command line, or every slide of --sheet."""
    if args.sheet is None:
        if args.slide is None or args.patches is None or args.out is None:
            parser.error("give SLIDE PATCHES --out F.h5, or --sheet with --patches-dir/--out-dir")
        cohort_only = (args.slide_ids, args.record_failed, args.failed_list)
        if args.patches_dir or args.out_dir or args.strict or any(cohort_only):
            parser.error(
                "--patches-dir, --out-dir, --strict, --slide-ids, --record-failed and "
                "--failed-list go with --sheet"
            )
        out_pt = None if args.no_pt else (args.out_pt or default_pt_path(args.out))
        slide_id = args.patches.stem
        return [SlideJob(slide_id, args.slide, args.patches, args.out, out_pt)]
    if args.slide or args.patches or args.out or args.out_pt:
        parser.error("--sheet takes no SLIDE, PATCHES, --out or --out-pt")
    if args.patches_dir is None or args.out_dir is None:
        parser.error("--sheet needs --patches-dir and --out-dir")
    sheet = read_slide_sheet(args.sheet, require_labels=False)
    if args.slide_ids:
        unknown = sorted(set(args.slide_ids) - set(sheet["slide_id"]))
        if unknown:
            raise PipelineError(
                f"{args.sheet}: --slide-ids {', '.join(unknown[:3])} not in the sheet "
                f"({len(unknown)} unknown)"
            )
        sheet = sheet[sheet["slide_id"].isin(args.slide_ids)]
    return [
        SlideJob(
            slide_id,
            Path(path),
            args.patches_dir / f"{slide_id}.h5",
            args.out_dir / f"{slide_id}.h5",
            None if args.no_pt else default_pt_path(args.out_dir / f"{slide_id}.h5"),
        )
        for slide_id, path in zip(sheet["slide_id"], sheet["path"], strict=True)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    spec = get_encoder_spec(args.encoder)
    jobs = slide_jobs(args, parser)
    if args.check:
        return check_outputs(args, spec, jobs)

    dtype = args.dtype or "float32"
    record = weights_record(spec, args.weights)
    device = resolve_device(args.device)
    params = ExtractParams(
        encoder=args.encoder,
        weights=args.weights,
        batch_size=args.batch_size,
        workers=default_workers(device) if args.workers is None else args.workers,
        device=args.device,
        precision=resolve_precision(args.precision, device),
        dtype=dtype,
        on_bad_patch=args.on_bad_patch,
        compile=args.compile,
        max_unreadable_fraction=args.max_unreadable_fraction,
    )
    runner = LazyRunner(device, params)
    if args.sheet is None:
        print(encode_slide(jobs[0], spec, record, params, runner, args.no_progress))
        return 0
    return encode_cohort(jobs, spec, record, params, runner, args)


def check_outputs(args: argparse.Namespace, spec: EncoderSpec, jobs: list[SlideJob]) -> int:
    """--check: validate without computing; compares weights and dtype only when given."""
    record = weights_record(spec, args.weights) if args.weights else None
    invalid = 0
    for job in jobs:
        problem = validate_features(job.out, job.patches, spec.name, record, args.dtype, job.out_pt)
        if problem and len(jobs) == 1:
            raise PipelineError(f"{job.out}: {problem}")
        if problem:
            invalid += 1
            print(f"error: {job.out}: {problem}", file=sys.stderr)
        else:
            print(f"{job.out}: valid features of {job.slide_id}")
    return 1 if invalid else 0


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


def encode_slide(
    job: SlideJob,
    spec: EncoderSpec,
    record: str,
    params: ExtractParams,
    runner: LazyRunner,
    no_progress: bool,
) -> str:
    """Make the outputs of one slide (keeping valid ones); returns the summary line."""
    patches = read_patches(job.patches)
    if job.out.exists():
        problem = validate_features(
            job.out, job.patches, spec.name, record, params.dtype, job.out_pt
        )
        problem = problem or _stale_verdict(job.out, params)
        if problem is None:
            return f"{patches.slide_id}: {job.out} is already complete and valid; skipped"
        log.warning("%s: existing output is invalid (%s); recomputing", job.out, problem)
    attrs = _output_attrs(job, spec, record, params, runner)
    if patches.status != STATUS_OK:
        reason = str(patches.attrs.get("status_reason", "")) or "no patches"
        _write_flagged(job, patches, spec, attrs, patches.status, reason, params.dtype)
        return (
            f"warning: {job.slide}: patches file is flagged {patches.status} ({reason}); "
            f"wrote an empty features file {job.out}"
        )
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


def encode_cohort(
    jobs: list[SlideJob],
    spec: EncoderSpec,
    record: str,
    params: ExtractParams,
    runner: LazyRunner,
    args: argparse.Namespace,
) -> int:
    """Every slide of the sheet with one model; a failing slide is listed and the others go
    on (unless --strict)."""
    failed: list[tuple[str, str]] = []
    bar = tqdm(jobs, desc=f"{spec.name} features", unit="slide", disable=args.no_progress)
    for job in bar:
        try:
            line = encode_slide(job, spec, record, params, runner, no_progress=True)
        except (OutputError, EncoderError):
            raise  # disk full, bad weights: every later slide would fail the same way
        except PipelineError as err:
            if args.strict:
                raise
            failed.append((job.slide_id, str(err)))
            line = f"error: {err}"
            if args.record_failed:
                line += _record_failure(job, spec, record, params, runner, str(err))
        else:
            unreadable = _failed_for_unreadable_patches(job.out)
            if unreadable:
                failed.append((job.slide_id, f"{job.slide}: {unreadable}"))
        tqdm.write(line, file=sys.stderr if line.startswith(("error", "warning")) else sys.stdout)
    failed_csv = args.failed_list or args.out_dir / "failed_slides.csv"
    with atomic_outputs(failed_csv) as (temp,):
        table = pd.DataFrame(failed, columns=["slide_id", "reason"])
        table.to_csv(temp, index=False)
    done = len(jobs) - len(failed)
    if failed and not done:
        every = f"every one of the {len(jobs)} slides failed, each named above"
        if not args.record_failed:
            raise PipelineError(f"{args.sheet}: {every}; listed in {failed_csv}")
        print(f"warning: {every}; each is recorded as failed", file=sys.stderr)
    summary = f"{done} of {len(jobs)} slides have features in {args.out_dir}"
    if failed:
        summary += f"; {len(failed)} failed, listed in {failed_csv}"
    print(summary)
    return 0


def _record_failure(
    job: SlideJob,
    spec: EncoderSpec,
    record: str,
    params: ExtractParams,
    runner: LazyRunner,
    reason: str,
) -> str:
    """--record-failed: a flagged empty output for a failed slide; what to add to its line."""
    try:
        patches = read_patches(job.patches)
    except PipelineError:
        return " (no features file written: its patches file cannot be read)"
    attrs = _output_attrs(job, spec, record, params, runner)
    _write_flagged(job, patches, spec, attrs, STATUS_FAILED, reason, params.dtype)
    return f" (recorded as failed in {job.out})"


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
    not_finite = np.flatnonzero(~np.isfinite(result.features).all(axis=1))
    if len(not_finite):
        x, y = coords[not_finite[0]]
        raise PipelineError(
            f"{job.slide}: encoder {spec.name} gave NaN/Inf features for {len(not_finite)} "
            f"patches (first at level-0 ({x}, {y})); check the weights ({attrs['weights']})"
        )
    for row, message in result.errors.items():
        x, y = patches.coords[row]
        log.warning(
            "%s: skipped unreadable patch at level-0 (%d, %d) (%s)", job.slide, x, y, message
        )
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
    line = (
        f"{patches.slide_id}: {len(coords)} patches → {spec.feature_dim}-d features "
        f"({spec.name}, {params.precision} on {runner.device}), {rate:.1f} patches/s"
    )
    if status == STATUS_FAILED:
        line = f"warning: {job.slide}: recorded as failed: {reason}; {line}"
    elif len(skipped):
        line = f"warning: {job.slide}: degraded: {reason}; {line}"
    return line


def unreadable_verdict(unreadable: int, total: int, max_fraction: float) -> tuple[str, str]:
    """(status, reason) of a slide with `unreadable` of its `total` patches skipped: `ok`
    (degraded when some were skipped, with the count and fraction in the reason), or `failed`
    when none could be read or more than `max_fraction` of them could not."""
    if unreadable == 0:
        return STATUS_OK, ""
    fraction = unreadable / total
    counted = f"{unreadable} of {total} patches unreadable ({fraction:.1%})"
    if unreadable == total:
        return STATUS_FAILED, f"no patch could be read ({counted})"
    if fraction > max_fraction:
        return STATUS_FAILED, (
            f"{counted}, more than the {max_fraction:.0%} allowed (--max-unreadable-fraction)"
        )
    return STATUS_OK, f"{counted}, skipped"


def _failed_for_unreadable_patches(path: Path) -> str | None:
    """The reason of a written output flagged failed for its unreadable patches, or None."""
    with h5py.File(path, "r") as h5:
        failed = plain(h5.attrs.get("status", STATUS_OK)) == STATUS_FAILED
        if failed and int(h5.attrs.get("n_skipped", 0)):
            return str(plain(h5.attrs.get("status_reason", "")))
    return None


def _stale_verdict(path: Path, params: ExtractParams) -> str | None:
    """Why a valid output's ok/failed verdict no longer holds (the allowed fraction of
    unreadable patches changed), or None."""
    with h5py.File(path, "r") as h5:
        skipped = int(h5.attrs.get("n_skipped", 0))
        recorded = h5.attrs.get("max_unreadable_fraction")
    if skipped and (recorded is None or float(recorded) != params.max_unreadable_fraction):
        return f"its verdict on {skipped} unreadable patches used another allowed fraction"
    return None


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


if __name__ == "__main__":
    run_cli(main)
