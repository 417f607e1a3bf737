"""Cohort summary of patching (`python -m preprocessing.summary`).

Reads the attributes of every patches h5 and writes one table of per-slide statistics
and one of the slides that failed or gave no patches, so a cohort run says plainly
which slides were left out and why.
"""

from __future__ import annotations

from pathlib import Path

from plumbing.atomic import atomic_outputs
from plumbing.cli import file_list_parser, run_cli, setup_logging
from preprocessing.slides.summary import read_patch_stats


def main(argv: list[str] | None = None) -> int:
    parser = file_list_parser(
        "python -m preprocessing.summary", __doc__.split("\n")[0], "patches", "patches h5 files"
    )
    parser.add_argument("--out", type=Path, required=True, help="per-slide statistics CSV")
    parser.add_argument("--failed", type=Path, required=True, help="CSV of failed or empty slides")
    args = parser.parse_args(argv)
    setup_logging()
    stats = read_patch_stats(args.patches)
    problems = stats[stats["status"] != "ok"][["slide_id", "status", "status_reason", "slide_path"]]
    with atomic_outputs(args.failed, args.out) as (failed_tmp, out_tmp):
        problems.to_csv(failed_tmp, index=False)
        stats.to_csv(out_tmp, index=False)
    ok = stats[stats["status"] == "ok"]
    print(
        f"{len(ok)}/{len(stats)} slides patched: {int(ok['n_patches'].sum())} patches, "
        f"{ok['tissue_area_mm2'].sum():.1f} mm² of tissue"
    )
    for row in problems.itertuples():
        print(f"warning: {row.slide_id}: {row.status} ({row.status_reason}) [{row.slide_path}]")
    return 0


if __name__ == "__main__":
    run_cli(main)
