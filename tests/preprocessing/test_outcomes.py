"""Patching and extraction return what they gave; the command line turns it into the same
words it always printed."""

from __future__ import annotations

from pathlib import Path

from plumbing.errors import SlideError
from preprocessing.features.extraction import ExtractedFeatures, FlaggedPatches, KeptFeatures
from preprocessing.slides.patching import PatchJob, PatchOutcome

JOB = PatchJob(slide=Path("s/a.svs"), slide_id="a", out=Path("p/a.h5"))


def test_a_patched_slide_is_one_line_and_no_warning():
    outcome = PatchOutcome(
        JOB, n_patches=12, tissue_area_mm2=1.234, mpp=0.5021, mpp_source="metadata", seconds=0.5
    )
    assert outcome.words() == "a: 12 patches, tissue 1.23 mm², mpp 0.5021 (metadata), 0.50 s"
    assert not outcome.is_warning


def test_a_slide_without_patches_or_unreadable_is_a_warning():
    empty = PatchOutcome(JOB, mpp=0.5, mpp_source="given", empty_reason="no tissue")
    assert empty.words() == (
        "warning: s/a.svs: 0 patches (no tissue); a: 0 patches, tissue 0.00 mm², mpp 0.5 "
        "(given), 0.00 s"
    )
    failed = PatchOutcome(JOB, failure=SlideError("s/a.svs", "cannot open"))
    assert failed.words() == "warning: s/a.svs: cannot open (recorded as failed in p/a.h5)"
    assert empty.is_warning and failed.is_warning


def test_extraction_outcomes_say_kept_flagged_extracted_degraded_and_failed():
    assert KeptFeatures("a", Path("f/a.h5")).words() == (
        "a: f/a.h5 is already complete and valid; skipped"
    )
    flagged = FlaggedPatches(Path("s/a.svs"), Path("f/a.h5"), "empty", "no tissue")
    assert flagged.is_warning and flagged.words() == (
        "warning: s/a.svs: patches file is flagged empty (no tissue); wrote an empty "
        "features file f/a.h5"
    )
    done = dict(
        slide_id="a", slide=Path("s/a.svs"), n_patches=10, feature_dim=512, encoder="resnet",
        precision="fp32", device="cpu", patches_per_second=12.34,
    )  # fmt: skip
    line = "a: 10 patches → 512-d features (resnet, fp32 on cpu), 12.3 patches/s"
    ok = ExtractedFeatures(**done, status="ok", reason="", unreadable=0)
    assert ok.words() == line and not ok.is_warning
    degraded = ExtractedFeatures(**done, status="ok", reason="1 of 11 unreadable", unreadable=1)
    assert degraded.words() == f"warning: s/a.svs: degraded: 1 of 11 unreadable; {line}"
    failed = ExtractedFeatures(**done, status="failed", reason="too many", unreadable=5)
    assert failed.words() == f"warning: s/a.svs: recorded as failed: too many; {line}"
