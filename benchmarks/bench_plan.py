"""How long Snakemake takes to plan (`snakemake -n`) a cohort of thousands of slides.

Generates slide sheets of the given sizes whose paths all point to one real small slide,
with `encoders: [uni, resnet50_trunc]` (random weights), the shipped models (six), 5 folds
and the shipped `features.slides_per_job`, and prints per size the planning seconds, the
peak memory of the snakemake process (its maximum resident set, from the kernel) and the
planned job count. Nothing is run: a dry run only. Each size runs in its own process.

    python benchmarks/bench_plan.py --sizes 1000 3000 10616
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_SLIDE = Path("/work/shared/fixtures/slides/cmu_small_region.svs")
PANDA_GRADES = ["0", "1", "2", "3", "4", "5"]


def write_cohort(folder: Path, n_slides: int, slide: Path, folds: int) -> Path:
    """A config for `n_slides` slides (two per patient, PANDA grades in turn) at `slide`."""
    sheet = pd.DataFrame(
        {
            "slide_id": [f"slide_{i:05d}" for i in range(n_slides)],
            "path": [str(slide)] * n_slides,
            "patient_id": [f"patient_{i // 2:05d}" for i in range(n_slides)],
            "label": [PANDA_GRADES[i % len(PANDA_GRADES)] for i in range(n_slides)],
        }
    )
    sheet.to_csv(folder / "slides.csv", index=False)
    config = yaml.safe_load((PROJECT_ROOT / "config" / "config.yaml").read_text())
    config.update(
        slides=str(folder / "slides.csv"),
        hierarchy=str(PROJECT_ROOT / "hmil" / "presets" / "hierarchies" / "panda.yaml"),
        outdir=str(folder / "results"),
        deploy=[],
        encoders=["uni", "resnet50_trunc"],
    )
    config["features"]["weights"] = {"uni": "random", "resnet50_trunc": "random"}
    config["splits"]["folds"] = folds
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def plan(config: Path, workdir: Path) -> tuple[float, float, float, int, str]:
    """(wall seconds, CPU seconds, peak MB of the snakemake process, planned jobs, output)
    of a dry run. CPU seconds (user + system) tell the cost on a shared machine, where the
    wall time also counts the waits for a core."""
    command = [
        sys.executable, "-m", "snakemake", "--snakefile",
        str(PROJECT_ROOT / "workflow" / "Snakefile"), "--configfile", str(config),
        "--directory", str(workdir), "--cores", "1", "--dry-run", "--quiet", "rules",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir)
    seconds = time.perf_counter() - start
    # ru_maxrss of the children: the largest of the processes waited for so far (KiB);
    # each size runs in its own process (main), so this is the snakemake process's peak.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mb, cpu_seconds = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    output = done.stdout + done.stderr
    total = re.search(r"^total\s+(\d+)$", output, re.MULTILINE)
    if done.returncode != 0 or total is None:
        raise SystemExit(f"snakemake -n failed (exit {done.returncode}):\n{output[-3000:]}")
    return seconds, cpu_seconds, peak_mb, int(total[1]), output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10616])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--slide", type=Path, default=FIXTURE_SLIDE)
    parser.add_argument("--show-rules", action="store_true", help="print the job table")
    args = parser.parse_args(argv)
    if not args.slide.is_file():
        raise SystemExit(f"{args.slide}: no such slide (give one with --slide)")
    if len(args.sizes) > 1:
        # one process per size, so that each peak is its own
        print(f"{'slides':>7} {'seconds':>8} {'CPU s':>8} {'peak MB':>8} {'jobs':>7}", flush=True)
        for size in args.sizes:
            extra = ["--show-rules"] if args.show_rules else []
            subprocess.run(
                [sys.executable, __file__, "--sizes", str(size), "--folds", str(args.folds),
                 "--slide", str(args.slide), *extra],
                check=True,
            )  # fmt: skip
        return
    with tempfile.TemporaryDirectory(prefix="bench_plan_") as tmp:
        folder = Path(tmp)
        config = write_cohort(folder, args.sizes[0], args.slide, args.folds)
        seconds, cpu_seconds, peak_mb, jobs, output = plan(config, folder)
    if args.show_rules:
        print(output)
    print(
        f"{args.sizes[0]:>7} {seconds:>8.1f} {cpu_seconds:>8.1f} {peak_mb:>8.0f} {jobs:>7}",
        flush=True,
    )


if __name__ == "__main__":
    main()
