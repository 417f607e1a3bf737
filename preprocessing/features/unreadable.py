"""Slides with unreadable patches: when one is degraded, when it is failed.

A corrupt tile should cost its patches, not the slide; a slide that has lost too many of
them would mislead training and is recorded as failed instead. The verdict is stored in
the features file with the fraction it used, so a re-run with another fraction redoes it.
"""

from __future__ import annotations

from pathlib import Path

import h5py

from preprocessing.slides.patch_files import STATUS_FAILED, STATUS_OK, plain


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


def failed_for_unreadable_patches(path: Path) -> str | None:
    """The reason of a written output flagged failed for its unreadable patches, or None."""
    with h5py.File(path, "r") as h5:
        failed = plain(h5.attrs.get("status", STATUS_OK)) == STATUS_FAILED
        if failed and int(h5.attrs.get("n_skipped", 0)):
            return str(plain(h5.attrs.get("status_reason", "")))
    return None


def stale_verdict(path: Path, max_fraction: float) -> str | None:
    """Why a valid output's ok/failed verdict no longer holds (the allowed fraction of
    unreadable patches changed), or None."""
    with h5py.File(path, "r") as h5:
        skipped = int(h5.attrs.get("n_skipped", 0))
        recorded = h5.attrs.get("max_unreadable_fraction")
    if skipped and (recorded is None or float(recorded) != max_fraction):
        return f"its verdict on {skipped} unreadable patches used another allowed fraction"
    return None
