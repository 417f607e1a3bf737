"""Cohort summary of feature extraction (`python -m preprocessing.feature_summary`).

Lists the slides whose unreadable patches (corrupt tiles) were left out by
`preprocessing.extract --on-bad-patch skip`: a degraded slide is kept with its readable
patches, one with more unreadable than `--max-unreadable-fraction` is recorded as failed and
left out of training. Without this table such a slide is visible only in its job's log.
"""

from __future__ import annotations

from pathlib import Path

from plumbing.atomic import atomic_outputs
from plumbing.cli import file_list_parser, run_cli, setup_logging
from preprocessing.features.summary import read_unreadable_patches


def main(argv: list[str] | None = None) -> int:
    parser = file_list_parser(
        "python -m preprocessing.feature_summary",
        __doc__.split("\n")[0],
        "features",
        "features h5 files",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="CSV of the slides with unreadable patches"
    )
    args = parser.parse_args(argv)
    setup_logging()
    table = read_unreadable_patches(args.features)
    with atomic_outputs(args.out) as (temp,):
        table.to_csv(temp, index=False)
    failed = table[table["status"] != "ok"]
    print(
        f"{len(table)} of {len(args.features)} feature files left unreadable patches out; "
        f"{len(failed)} of them recorded as failed"
    )
    for row in table.itertuples():
        verdict = "failed" if row.status != "ok" else "degraded"
        print(f"warning: {row.slide_id} ({row.encoder}): {verdict}: {row.status_reason}")
    return 0


if __name__ == "__main__":
    run_cli(main)
