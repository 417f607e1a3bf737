"""Feature extraction speed: model alone vs end to end (read + resize + model), patches/s.

    python benchmarks/bench_features.py [--encoders resnet50_trunc uni | all]
        [--precisions fp32 bf16] [--workers 1 2] [--batch-size 64] [--patches 512]
        [--device auto] [--threads N] [--compile] [--profile] [--repeats R] [--reader-only]

`--encoders all` runs every registered encoder (one that cannot be built here, e.g. without
its optional package, is named and skipped), so one command on a GPU machine measures them all:
    python benchmarks/bench_features.py --encoders all --device cuda

Model-only pushes random uint8 batches through the same normalise + model path as
`python -m preprocessing.extract` (`EncoderRunner`). End-to-end runs `extract_features`
on a generated JPEG-tiled slide (20×, 0.5 µm/px, written once and kept) patched with
`preprocessing.patch`: OpenSlide reads in DataLoader workers, cv2 resize 256 → 224,
normalisation on the device. Their ratio says how much reading costs. CPU ms/patch (all
processes, workers included) is printed too: on a shared machine it moves much less than
wall time. `--profile` adds the cost of each reading step. `--reader-only` times the
DataLoader alone (read, resize, collate; no model): the rate a GPU can be fed at, per
worker process. Weights are random (speed does not depend on them)."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import torch

from preprocessing.features.encoders import EncoderError, build_encoder, list_encoders
from preprocessing.features.patch_dataset import (
    PatchDataset,
    iter_batches,
    patch_loader,
    read_geometry,
)
from preprocessing.features.runner import (
    EncoderRunner,
    default_workers,
    extract_features,
    resolve_device,
)
from preprocessing.slides.access import open_slide, read_rgb
from preprocessing.slides.patching import PatchParams, patch_slide
from preprocessing.slides.synthetic import two_region_spec, write_slide

WIDTH, HEIGHT, MPP = 16_000, 12_000, 0.5  # ~620 tissue patches of 256 px at 0.5 µm/px


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers)."""
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def model_only(runner: EncoderRunner, count: int, batch_size: int) -> tuple[float, float]:
    """(patches/s, CPU ms/patch) of normalise + model on random uint8 batches."""
    size = runner.input_size
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, size, size, 3)
    batch = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    batch = batch.permute(0, 3, 1, 2)  # channels-last memory, as the loader collates it
    runner(batch)  # warm-up: oneDNN primitives, cuDNN plans
    synchronize(runner.device)
    done, cpu, start = 0, cpu_seconds(), time.perf_counter()
    while done < count:
        take = min(batch_size, count - done)
        runner(batch[:take])
        done += take
    synchronize(runner.device)
    return count / (time.perf_counter() - start), 1000 * (cpu_seconds() - cpu) / count


def end_to_end(runner, dataset, feature_dim, batch_size, workers) -> tuple[float, float]:
    """(patches/s, CPU ms/patch) of `extract_features`: reading, resizing, model."""
    cpu = cpu_seconds()
    result = extract_features(dataset, runner, feature_dim, batch_size, workers, progress=False)
    return len(dataset) / result.seconds, 1000 * (cpu_seconds() - cpu) / len(dataset)


def reader_only(dataset: PatchDataset, batch_size: int, workers: int) -> tuple[float, float]:
    """(patches/s, CPU ms/patch) of the DataLoader alone: what the readers can supply."""
    cpu, start = cpu_seconds(), time.perf_counter()
    count = sum(
        len(batch.indices) for batch in iter_batches(patch_loader(dataset, batch_size, workers))
    )
    dataset.close()
    return count / (time.perf_counter() - start), 1000 * (cpu_seconds() - cpu) / count


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_reading(dataset: PatchDataset, count: int = 64) -> dict[str, float]:
    """ms per patch of each reading step, in this process, one thread."""
    slide, geometry = open_slide(dataset.slide_path), dataset.geometry
    coords = [tuple(int(v) for v in c) for c in dataset.coords[:count]]
    side = (geometry.region_size,) * 2
    timings = {}
    start = time.perf_counter()
    regions = [read_rgb(slide, xy, geometry.level, side) for xy in coords]
    timings["read_region + RGBA→RGB"] = time.perf_counter() - start
    start = time.perf_counter()
    for region in regions:
        cv2.resize(region, (geometry.input_size,) * 2, interpolation=geometry.interpolation)
    timings[f"resize {geometry.region_size}→{geometry.input_size}"] = time.perf_counter() - start
    slide.close()
    return {step: 1000 * seconds / len(coords) for step, seconds in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--encoders",
        nargs="+",
        default=["resnet50_trunc", "uni"],
        help="registered names, timm:<model>, or 'all' (every registered encoder)",
    )
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument(
        "--workers",
        nargs="+",
        type=int,
        help="reader processes to try (default: 1 2 on CPU, extract's default on GPU)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--patches", type=int, default=512)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=1, help="best of N runs (shared machines)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--profile", action="store_true", help="time each reading step")
    parser.add_argument(
        "--reader-only", action="store_true", help="time the DataLoader alone, no model"
    )
    parser.add_argument(
        "--slide", type=Path, default=Path(tempfile.gettempdir()) / "bench_features_20x.tiff"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # random-weights warnings are expected here
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.workers is None:
        args.workers = [1, 2] if device.type == "cpu" else [default_workers(device)]
    if args.encoders == ["all"]:
        args.encoders = list_encoders()
    if not args.slide.exists():
        print(f"generating {args.slide} ({WIDTH} x {HEIGHT} px at {MPP} µm/px) ...", flush=True)
        write_slide(args.slide, two_region_spec(WIDTH, HEIGHT, MPP))
    patches = patch_slide(args.slide, PatchParams())
    coords = patches.grid.coords[: args.patches]
    cpus = len(os.sched_getaffinity(0))
    print(
        f"slide {args.slide.name}: {len(coords)} of {len(patches.grid.coords)} patches; "
        f"device {device}, {cpus} CPUs, torch threads {torch.get_num_threads()}"
    )
    header = f"{'encoder':15} {'precision':9} {'workers':>7} {'batch':>5} "
    print(
        header + f"{'model p/s':>9} {'e2e p/s':>8} {'e2e/model':>9}   "
        f"{'CPU ms/patch: model':>19} {'e2e':>6}"
    )
    for name in args.encoders:
        try:
            model, spec, _ = build_encoder(name, "random")
        except EncoderError as err:  # e.g. an optional package missing: the others go on
            print(f"{name:15} skipped: {err}", flush=True)
            continue
        slide = open_slide(args.slide)
        geometry = read_geometry(
            slide, patches.mpp.value, patches.grid.patch_size_level0, spec.mpp, spec.input_size
        )
        slide.close()
        dataset = PatchDataset(args.slide, coords, geometry)
        if args.profile:
            steps = ", ".join(f"{k} {v:.2f} ms" for k, v in profile_reading(dataset).items())
            print(f"{name} reading per patch: {steps}")
        if args.reader_only:
            for workers in args.workers:
                rate, cpu_ms = max(
                    reader_only(dataset, args.batch_size, workers) for _ in range(args.repeats)
                )
                print(
                    f"{name:15} reader only, {workers} workers: {rate:.1f} patches/s, "
                    f"{cpu_ms:.2f} CPU ms/patch ({1000 / cpu_ms:.0f} patches/s per busy core)",
                    flush=True,
                )
            continue
        for precision in args.precisions:
            if precision == "fp16" and device.type != "cuda":
                continue
            runner = EncoderRunner(model, spec, device, precision, args.compile, args.batch_size)
            if args.compile:
                print(f"{name} {precision}: compiled in {runner.warm_up():.1f} s", flush=True)
            alone, alone_cpu = max(
                model_only(runner, len(coords), args.batch_size) for _ in range(args.repeats)
            )
            for workers in args.workers:
                runs = [
                    end_to_end(runner, dataset, spec.feature_dim, args.batch_size, workers)
                    for _ in range(args.repeats)
                ]
                full, full_cpu = max(runs)
                median = statistics.median(rate for rate, _ in runs)
                print(
                    f"{name:15} {precision:9} {workers:>7} {args.batch_size:>5} "
                    f"{alone:>9.1f} {full:>8.1f} {full / alone:>9.0%}   "
                    f"{alone_cpu:>19.1f} {full_cpu:>6.1f}"
                    + (f"  (e2e median {median:.1f})" if len(runs) > 1 else ""),
                    flush=True,
                )
            del runner
        del model  # a ViT-g holds GBs: free it before the next encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
