"""Features of every slide of a sheet in one process, the model loaded once.

A slide that fails is listed in a CSV and the others go on, unless the run is strict:
one unreadable slide must not cost a cohort its features. Failures that would repeat on
every slide (disk full, bad weights) stop the run at once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from plumbing.atomic import atomic_outputs
from plumbing.errors import OutputError, PipelineError
from preprocessing.features.encoders import EncoderError, EncoderSpec
from preprocessing.features.extraction import (
    ExtractParams,
    LazyRunner,
    SlideJob,
    encode_slide,
    record_failure,
)
from preprocessing.features.features_files import default_pt_path, validate_features
from preprocessing.features.unreadable import failed_for_unreadable_patches
from preprocessing.slides.sheet import read_slide_sheet


@dataclass(frozen=True)
class CohortOptions:
    """Where a cohort's outputs go and what a failing slide does to the run."""

    sheet: Path
    out_dir: Path
    strict: bool = False  #: stop at the first slide that fails
    record_failed: bool = False  #: a failed slide still gets a (flagged) features file
    failed_list: Path | None = None  #: default: <out_dir>/failed_slides.csv
    shard_record: Path | None = None  #: every slide's status, written last (workflow)

    @property
    def failed_csv(self) -> Path:
        return self.failed_list or self.out_dir / "failed_slides.csv"


def sheet_jobs(
    sheet_path: Path,
    patches_dir: Path,
    out_dir: Path,
    slide_ids: list[str] | None = None,
    write_pt: bool = True,
) -> list[SlideJob]:
    """Every slide of the sheet (or those of `slide_ids`: a workflow shard), in its order."""
    sheet = read_slide_sheet(sheet_path, require_labels=False)
    if slide_ids:
        unknown = sorted(set(slide_ids) - set(sheet["slide_id"]))
        if unknown:
            raise PipelineError(
                f"{sheet_path}: --slide-ids {', '.join(unknown[:3])} not in the sheet "
                f"({len(unknown)} unknown)"
            )
        sheet = sheet[sheet["slide_id"].isin(slide_ids)]
    return [
        SlideJob(
            slide_id,
            Path(path),
            patches_dir / f"{slide_id}.h5",
            out_dir / f"{slide_id}.h5",
            default_pt_path(out_dir / f"{slide_id}.h5") if write_pt else None,
        )
        for slide_id, path in zip(sheet["slide_id"], sheet["path"], strict=True)
    ]


def check_outputs(
    jobs: list[SlideJob], spec: EncoderSpec, record: str | None, dtype: str | None
) -> int:
    """Validate without computing; compares weights and dtype only when given."""
    invalid = 0
    for job in jobs:
        problem = validate_features(job.out, job.patches, spec.name, record, dtype, job.out_pt)
        if problem and len(jobs) == 1:
            raise PipelineError(f"{job.out}: {problem}")
        if problem:
            invalid += 1
            print(f"error: {job.out}: {problem}", file=sys.stderr)
        else:
            print(f"{job.out}: valid features of {job.slide_id}")
    return 1 if invalid else 0


def encode_cohort(
    jobs: list[SlideJob],
    spec: EncoderSpec,
    record: str,
    params: ExtractParams,
    runner: LazyRunner,
    options: CohortOptions,
    no_progress: bool = False,
) -> int:
    """Every slide of the sheet with one model; a failing slide is listed and the others go
    on (unless strict)."""
    failed: list[tuple[str, str]] = []
    bar = tqdm(jobs, desc=f"{spec.name} features", unit="slide", disable=no_progress)
    for job in bar:
        try:
            outcome = encode_slide(job, spec, record, params, runner, no_progress=True)
        except (OutputError, EncoderError):
            raise  # disk full, bad weights: every later slide would fail the same way
        except PipelineError as err:
            if options.strict:
                raise
            failed.append((job.slide_id, str(err)))
            tqdm.write(failure_words(err, job, spec, record, params, runner, options), sys.stderr)
            continue
        unreadable = failed_for_unreadable_patches(job.out)
        if unreadable:
            failed.append((job.slide_id, f"{job.slide}: {unreadable}"))
        tqdm.write(outcome.words(), file=sys.stderr if outcome.is_warning else sys.stdout)
    _report(failed, len(jobs), options)
    if options.shard_record is not None:
        _write_shard_record(jobs, dict(failed), options.shard_record)
    return 0


def failure_words(
    error: PipelineError,
    job: SlideJob,
    spec: EncoderSpec,
    record: str,
    params: ExtractParams,
    runner: LazyRunner,
    options: CohortOptions,
) -> str:
    """The line of a slide that failed, after recording it when asked (--record-failed)."""
    line = f"error: {error}"
    if not options.record_failed:
        return line
    written = record_failure(job, spec, record, params, runner, str(error))
    if written is None:
        return line + " (no features file written: its patches file cannot be read)"
    return line + f" (recorded as failed in {written})"


def _write_shard_record(jobs: list[SlideJob], failed: dict[str, str], path: Path) -> None:
    """One row per slide of the run: its status ("ok" or "failed"), why, and its file."""
    rows = [
        (job.slide_id, "failed" if job.slide_id in failed else "ok",
         failed.get(job.slide_id, ""), str(job.out))
        for job in jobs
    ]  # fmt: skip
    with atomic_outputs(path) as (temp,):
        pd.DataFrame(rows, columns=["slide_id", "status", "reason", "features"]).to_csv(
            temp, index=False
        )


def _report(failed: list[tuple[str, str]], total: int, options: CohortOptions) -> None:
    """The list of failed slides, and the run's summary line (an error when none is left)."""
    failed_csv = options.failed_csv
    with atomic_outputs(failed_csv) as (temp,):
        table = pd.DataFrame(failed, columns=["slide_id", "reason"])
        table.to_csv(temp, index=False)
    done = total - len(failed)
    if failed and not done:
        every = f"every one of the {total} slides failed, each named above"
        if not options.record_failed:
            raise PipelineError(f"{options.sheet}: {every}; listed in {failed_csv}")
        print(f"warning: {every}; each is recorded as failed", file=sys.stderr)
    summary = f"{done} of {total} slides have features in {options.out_dir}"
    if failed:
        summary += f"; {len(failed)} failed, listed in {failed_csv}"
    print(summary)
