"""Segmentation + patching speed on a generated 100,000 × 80,000 px slide at 0.25 µm/px.

    python benchmarks/bench_patching.py [--slide PATH] [--repeats 5]

Slide generation is excluded from the timing (it runs in a child process, once, and the
slide is kept for later runs). Timed: open, mpp, segmentation, patch grid, QC PNG, GeoJSON
and patches h5, i.e. what `python -m preprocessing.patch` does, on one core.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the goal states

import cv2

from preprocessing.slides.patching import PatchParams, patch_slide, write_outputs
from preprocessing.slides.synthetic import expected_patch_count, two_region_spec

WIDTH, HEIGHT, MPP, LEVELS = 100_000, 80_000, 0.25, 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--slide", type=Path, default=Path(tempfile.gettempdir()) / "bench_100k.tiff"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    spec = two_region_spec(WIDTH, HEIGHT, MPP, levels=LEVELS)
    if not args.slide.exists():
        print(f"generating {args.slide} ({WIDTH} x {HEIGHT} px, {LEVELS} levels) ...", flush=True)
        start = time.perf_counter()
        code = (
            "from preprocessing.slides.synthetic import two_region_spec, write_slide\n"
            f"spec = two_region_spec({WIDTH}, {HEIGHT}, {MPP}, levels={LEVELS})\n"
            f"write_slide({str(args.slide)!r}, spec, progress=True)\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
        size_gb = args.slide.stat().st_size / 1e9
        print(f"generated in {time.perf_counter() - start:.0f} s, {size_gb:.2f} GB")

    params = PatchParams()
    out = Path(tempfile.mkdtemp())
    times, count = [], 0
    for repeat in range(args.repeats):
        start = time.perf_counter()
        result = patch_slide(args.slide, params, qc=True)
        write_outputs(result, params, out / "p.h5", out / "qc.png", out / "tissue.geojson")
        times.append(time.perf_counter() - start)
        count = len(result.grid.coords)
        print(f"run {repeat}: {times[-1]:.3f} s")
    expected = expected_patch_count(spec, params.target_mpp, params.patch_size, params.min_tissue)
    best, median = min(times), statistics.median(times)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"slide            {WIDTH} x {HEIGHT} px at {MPP} µm/px, {LEVELS} levels")
    print(f"seconds          median {median:.3f}, best {best:.3f} (QC PNG + GeoJSON + h5 included)")
    error = 100 * (count - expected) / expected
    print(f"patches          {count} (analytic {expected}, {error:+.1f}%)")
    print(f"patches/s        {count / median:,.0f}")
    print(f"peak memory      {peak_mib:.0f} MiB (whole process)")


if __name__ == "__main__":
    main()
