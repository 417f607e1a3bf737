"""Training and evaluation at PANDA's scale: seconds per epoch, peak memory, evaluation time.

    python benchmarks/bench_panda_scale.py [--slides 1000 10000] [--dim 1024]
        [--instances 100 500] [--models hmil abmil] [--folds 5] [--cache-gib 2]
        [--workdir DIR] [--threads 2] [--json OUT]

Per cohort size: a generated cohort (PANDA's ISUP proportions on the panda hierarchy, one
biopsy per patient, bags of uniform 100–500 instances, float16 features as extraction
writes them) is split 5-fold by ``hmil.splits``; every model trains one epoch of every
fold through ``python -m hmil.train --epochs 1`` (so the val pass, the test predictions
and the attention file are in the time); ``hmil.evaluate`` evaluates each model's folds and
``hmil.compare`` compares them. Each command is its own process, timed by the wall clock,
its peak memory read from the kernel (``wait4``'s ru_maxrss of that child alone).

The features of a 10,000-slide cohort take about 12 GiB as float32, more than a quarter of
this machine's memory: with ``--cache-gib`` the training keeps that much in memory and
reads the rest from disk every epoch, so its peak stays near the budget plus the model.
Seconds and memory per slide per size show whether a step grows linearly: a column that
grows with the cohort means a step that does not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
HIERARCHY = "panda"
ISUP = ("0", "1", "2", "3", "4", "5")  # the panda hierarchy's fine labels
ISUP_SHARE = (0.27, 0.26, 0.13, 0.12, 0.12, 0.11)  # PANDA's grade proportions
SIGNAL = 4.0  # key instances this many noise SDs out, as the learning check's cohorts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", nargs="+", type=int, default=[1_000, 10_000])
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension D (UNI: 1024)")
    parser.add_argument(
        "--instances", nargs=2, type=int, default=[100, 500], metavar=("MIN", "MAX")
    )
    parser.add_argument("--models", nargs="+", default=["hmil", "abmil"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--cache-gib", type=float, default=2.0,
        help="hmil.train --cache-gib: the feature cache budget of every training run",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads per command")
    parser.add_argument(
        "--workdir", type=Path, default=ROOT / "benchmarks" / "_panda_scale",
        help="cohorts are generated here once and reused (delete to regenerate)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here (after each size)")
    return parser.parse_args(argv)


def generate(folder: Path, slides: int, dim: int, instances: tuple[int, int]) -> float:
    """Write the cohort (features/<id>.h5 and slides.csv) unless it is there; its seconds."""
    sheet = folder / "slides.csv"
    if sheet.exists():  # written last, so its presence means the cohort is whole
        return 0.0
    start = time.perf_counter()
    rng = np.random.default_rng(slides)
    features_dir = folder / "features"
    features_dir.mkdir(parents=True, exist_ok=True)
    counts = np.floor(np.asarray(ISUP_SHARE) * slides).astype(int)
    counts[0] += slides - counts.sum()
    labels = rng.permutation(np.repeat(np.arange(len(ISUP)), counts))
    means = SIGNAL * np.linalg.qr(rng.standard_normal((dim, len(ISUP))))[0].T
    rows = []
    for index, label in enumerate(labels):
        slide_id = f"panda_{index:05d}"
        num = int(rng.integers(instances[0], instances[1] + 1))
        bag = rng.standard_normal((num, dim), dtype=np.float32)
        keys = rng.choice(num, size=max(1, num // 20), replace=False)
        bag[keys] += means[label].astype(np.float32)
        coords = np.stack([np.arange(num) % 64, np.arange(num) // 64], axis=1) * 256
        with h5py.File(features_dir / f"{slide_id}.h5", "w") as file:
            file.create_dataset("features", data=bag.astype(np.float16))
            file.create_dataset("coords", data=coords.astype(np.int64))
        rows.append(
            {
                "slide_id": slide_id,
                "path": f"slides/{slide_id}.svs",  # the sheet's column; no slide is read
                "patient_id": f"p{index:05d}",
                "label": ISUP[label],
            }
        )
    partial = sheet.with_suffix(".csv.partial")
    pd.DataFrame(rows).to_csv(partial, index=False)
    partial.rename(sheet)
    return time.perf_counter() - start


def timed(command: list[str], threads: int) -> dict:
    """Run ``command``; its seconds and peak RSS (this child only); exit on failure."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"failed ({child.returncode}): {' '.join(command)}\n{output.decode()[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def epoch_seconds(run_dir: Path) -> float | None:
    """The training epoch's own seconds, from the run's history if it records them."""
    history = run_dir / "log.csv"
    if not history.exists():
        return None
    table = pd.read_csv(history)
    column = next((c for c in ("epoch_seconds", "seconds", "time") if c in table.columns), None)
    return float(table[column].iloc[-1]) if column else None


def bench_size(args: argparse.Namespace, slides: int) -> dict:
    folder = args.workdir / f"cohort_{slides}"
    py = sys.executable
    result: dict = {"slides": slides, "dim": args.dim, "cache_gib": args.cache_gib}
    print(f"\n== {slides} slides: generating (or reusing) the cohort in {folder}", flush=True)
    result["generate_seconds"] = round(generate(folder, slides, args.dim, args.instances), 1)
    sizes = [os.path.getsize(p) for p in (folder / "features").glob("*.h5")]
    result["features_gib_on_disk"] = round(sum(sizes) / 2**30, 2)
    with h5py.File(next((folder / "features").glob("*.h5"))) as file:
        assert file["features"].shape[1] == args.dim
    splits = folder / "DATA_SPLIT.csv"
    result["splits"] = timed(
        [py, "-m", "hmil.splits", str(folder / "slides.csv"), "--folds", str(args.folds),
         "--hierarchy", HIERARCHY, "--out", str(splits)], args.threads,
    )  # fmt: skip
    runs = folder / f"runs_cache{args.cache_gib:g}"
    shutil.rmtree(runs, ignore_errors=True)  # earlier runs would be skipped, not timed
    result["train"], result["evaluate"] = {}, {}
    evals = []
    for model in args.models:
        fold_runs = []
        for fold in range(args.folds):
            out = runs / model / f"fold{fold}"
            print(f"   train {model} fold {fold}", flush=True)
            record = timed(
                [py, "-m", "hmil.train", "--features", str(folder / "features"), "--splits",
                 str(splits), "--fold", str(fold), "--model", model, "--hierarchy", HIERARCHY,
                 "--out", str(out), "--epochs", "1", "--cache-gib", str(args.cache_gib),
                 "--restart-if-changed"], args.threads,
            )  # fmt: skip
            record["epoch_seconds"] = epoch_seconds(out)
            print(f"     {record}", flush=True)
            fold_runs.append(record)
        result["train"][model] = fold_runs
        print(f"   evaluate {model}", flush=True)
        eval_dir = runs / "eval" / model
        folds = [str(runs / model / f"fold{k}") for k in range(args.folds)]
        result["evaluate"][model] = timed(
            [py, "-m", "hmil.evaluate", *folds, "--out", str(eval_dir),
             "--name", f"synthetic/{model}"], args.threads,
        )  # fmt: skip
        evals.append(str(eval_dir))
    print("   compare", flush=True)
    result["compare"] = timed(
        [py, "-m", "hmil.compare", *evals, "--out", str(runs / "comparison.csv"),
         "--md", str(runs / "comparison.md"), "--plot", str(runs / "comparison.png")],
        args.threads,
    )  # fmt: skip
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| slides | step | seconds | s / 1k slides | peak RSS GiB |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        per_k = 1000 / r["slides"]
        steps = [("splits", r["splits"])]
        for model, folds in r["train"].items():
            mean = {k: float(np.mean([f[k] for f in folds])) for k in ("seconds", "peak_rss_gib")}
            epochs = [f["epoch_seconds"] for f in folds if f["epoch_seconds"] is not None]
            label = f"train {model} (1 epoch, mean of {len(folds)} folds"
            label += f"; epoch alone {np.mean(epochs):.0f} s)" if epochs else ")"
            peak = max(f["peak_rss_gib"] for f in folds)
            steps.append((label, {"seconds": mean["seconds"], "peak_rss_gib": peak}))
        for model, evaluation in r["evaluate"].items():
            steps.append((f"evaluate {model} ({len(r['train'][model])} folds)", evaluation))
        steps.append(("compare", r["compare"]))
        for name, step in steps:
            lines.append(
                f"| {r['slides']:,} | {name} | {step['seconds']:.1f} | "
                f"{step['seconds'] * per_k:.1f} | {step['peak_rss_gib']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(
        f"D = {args.dim}, {args.instances[0]}–{args.instances[1]} instances per bag, "
        f"{args.folds} folds, models {args.models}, feature cache {args.cache_gib:g} GiB, "
        f"{args.threads} threads per command, {os.cpu_count()} CPUs",
        flush=True,
    )
    results = []
    for slides in args.slides:
        results.append(bench_size(args, slides))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        print(table(results), flush=True)


if __name__ == "__main__":
    main()
