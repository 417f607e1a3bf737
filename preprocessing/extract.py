"""Encode a slide's patches into features (`python -m preprocessing.extract`).

Reads the patches h5 of `preprocessing.patch`, runs the patches through a registered
encoder (`preprocessing.features.encoders`) and writes the features h5 plus a per-slide `.pt`
tensor, together and atomically (:mod:`preprocessing.features.features_files`). One slide
is :mod:`preprocessing.features.extraction`'s, a sheet of them
:mod:`preprocessing.features.cohort`'s; this module is their command line.

A valid existing output is kept (checked with `validate_features`); an invalid one is
rebuilt with a log line saying why. Flagged patches files (no tissue, failed slide) give
an empty, flagged features file and exit 0.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from plumbing.cli import add_options, run_cli, setup_logging
from plumbing.gpu_claim import claim_for_device
from preprocessing.features.cohort import CohortOptions, check_outputs, encode_cohort, sheet_jobs
from preprocessing.features.encoders import get_encoder_spec, weights_record
from preprocessing.features.extraction import ExtractParams, LazyRunner, SlideJob, encode_slide
from preprocessing.features.features_files import default_pt_path
from preprocessing.features.runner import default_workers, resolve_device, resolve_precision
from preprocessing.features.settings import ExtractSettings

log = logging.getLogger("hmil.extract")


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
    _add_cohort_options(parser)
    _add_encoding_options(parser)
    parser.add_argument(
        "--check", action="store_true", help="only validate existing outputs; exit 1 if invalid"
    )
    out_pt = parser.add_mutually_exclusive_group()
    out_pt.add_argument("--out-pt", type=Path, help="N×D float32 tensor (default: --out with .pt)")
    out_pt.add_argument("--no-pt", action="store_true", help="write no .pt tensor")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _add_cohort_options(parser: argparse.ArgumentParser) -> None:
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
    cohort.add_argument(
        "--shard-record",
        type=Path,
        help="CSV written last, one row per slide of the run (slide_id, status, reason, "
        "features): the workflow's record that a shard is complete",
    )


def _add_encoding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights", help="checkpoint file, or 'random' (tests only); default: download"
    )
    add_options(parser, ExtractSettings)
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")


def slide_jobs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[SlideJob]:
    """The slides to encode: the one given on the command line, or every slide of --sheet."""
    if args.sheet is None:
        if args.slide is None or args.patches is None or args.out is None:
            parser.error("give SLIDE PATCHES --out F.h5, or --sheet with --patches-dir/--out-dir")
        cohort_only = (args.slide_ids, args.record_failed, args.failed_list, args.shard_record)
        if args.patches_dir or args.out_dir or args.strict or any(cohort_only):
            parser.error(
                "--patches-dir, --out-dir, --strict, --slide-ids, --record-failed, "
                "--failed-list and --shard-record go with --sheet"
            )
        out_pt = None if args.no_pt else (args.out_pt or default_pt_path(args.out))
        return [SlideJob(args.patches.stem, args.slide, args.patches, args.out, out_pt)]
    if args.slide or args.patches or args.out or args.out_pt:
        parser.error("--sheet takes no SLIDE, PATCHES, --out or --out-pt")
    if args.patches_dir is None or args.out_dir is None:
        parser.error("--sheet needs --patches-dir and --out-dir")
    return sheet_jobs(
        args.sheet, args.patches_dir, args.out_dir, args.slide_ids, write_pt=not args.no_pt
    )


def extract_params(args: argparse.Namespace, device: torch.device) -> ExtractParams:
    """The run's parameters with every default resolved for `device`."""
    return ExtractParams(
        encoder=args.encoder,
        weights=args.weights,
        batch_size=args.batch_size,
        workers=default_workers(device) if args.workers is None else args.workers,
        device=args.device,
        precision=resolve_precision(args.precision, device),
        dtype=args.dtype or "float32",
        on_bad_patch=args.on_bad_patch,
        compile=args.compile,
        max_unreadable_fraction=args.max_unreadable_fraction,
    )


def say_one_gpu(device: torch.device) -> None:
    """One log line when several GPUs are visible: extraction runs on one of them."""
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        log.info(
            "%d GPUs visible; this extraction uses one, %s (claim one per job: see "
            "plumbing/gpu_claim.py)", torch.cuda.device_count(), device,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    spec = get_encoder_spec(args.encoder)
    jobs = slide_jobs(args, parser)
    if args.check:
        record = weights_record(spec, args.weights) if args.weights else None
        return check_outputs(jobs, spec, record, args.dtype)
    record = weights_record(spec, args.weights)
    # before torch starts CUDA: this job's own GPU on a machine of several
    claim_for_device(args.device)
    device = resolve_device(args.device)
    say_one_gpu(device)
    params = extract_params(args, device)
    runner = LazyRunner(device, params)
    if args.sheet is None:
        print(encode_slide(jobs[0], spec, record, params, runner, args.no_progress).words())
        return 0
    options = CohortOptions(
        args.sheet, args.out_dir, args.strict, args.record_failed, args.failed_list,
        args.shard_record,
    )  # fmt: skip
    return encode_cohort(jobs, spec, record, params, runner, options, args.no_progress)


if __name__ == "__main__":
    run_cli(main)
