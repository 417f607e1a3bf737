"""Training cost per epoch of the default protocol against the paper's, as users run it.

    python benchmarks/bench_epoch.py [--cell middle] [--models hmil abmil] [--epochs 3]
        [--threads 1] [--no-cache] [--protocols paper default] [--repeats 1]

Trains ``hmil.train`` for a few epochs under ``--protocol default`` and ``--protocol
paper`` (nothing else set) on fold 0 of one learning-check cohort (seed 0), and prints the
median seconds per epoch from each run's ``log.csv`` (training pass and validation),
optimiser steps per epoch and training bags per second. The default protocol takes 8
bags per step where the paper takes 64, so it makes 8× the steps, and it drops a quarter
of each training bag's instances: the question is whether an epoch costs more.
``--no-cache`` reads every bag from its file every epoch (by default a cohort that fits in
memory is read once). ``--repeats R`` trains every (model, protocol) R times, taking turns,
and reports the median run: on a busy machine the load drifts, and taking turns spreads the
drift over the models alike (each model's cost relative to the first model is printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from hmil.data.hierarchy import load_hierarchy
from hmil.train import main as train_main

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning_check  # a sibling script, not a package


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", default="middle", choices=sorted(learning_check.CELLS))
    parser.add_argument("--models", nargs="+", default=["hmil", "abmil"])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (≥ 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-cache", action="store_true", help="hmil.train --no-cache")
    parser.add_argument("--protocols", nargs="+", default=["paper", "default"])
    parser.add_argument("--repeats", type=int, default=1, help="runs per (model, protocol)")
    return parser.parse_args(argv)


def epoch_cost(
    root: Path, model: str, protocol: str, epochs: int, extra: list[str], repeat: int = 0
) -> dict:
    out = root / f"{model}_{protocol}_{repeat}"
    args = [
        "--features", str(root / "features"), "--splits", str(root / "DATA_SPLIT.csv"),
        "--fold", "0", "--model", model, "--hierarchy", learning_check.HIERARCHY,
        "--out", str(out), "--protocol", protocol, "--epochs", str(epochs), *extra,
    ]  # fmt: skip
    if train_main(args) != 0:
        raise RuntimeError(f"hmil.train failed: {' '.join(args)}")
    log = pd.read_csv(out / "log.csv")
    splits = pd.read_csv(root / "DATA_SPLIT.csv")
    train_bags = int((splits["fold0"] == "train").sum())
    batch = json.loads((out / "metrics.json").read_text())["config"]["batch_bags"]
    seconds = float(log["seconds"].median())
    return {
        "model": model,
        "protocol": protocol,
        "s/epoch": seconds,
        "steps/epoch": math.ceil(train_bags / batch),
        "bags/s": train_bags / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    cell = learning_check.CELLS[args.cell]
    hierarchy = load_hierarchy(learning_check.HIERARCHY)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        learning_check.prepare_cohort(cell, 0, 3, Path(scratch), hierarchy)
        root = Path(scratch) / cell.name / "seed0"
        extra = ["--no-cache"] if args.no_cache else []
        for repeat in range(args.repeats):
            for model in dict.fromkeys(args.models):
                for protocol in args.protocols:
                    rows.append(epoch_cost(root, model, protocol, args.epochs, extra, repeat))
                    print(f"  {model} {protocol}: {rows[-1]['s/epoch']:.2f} s/epoch", flush=True)
    table = pd.DataFrame(rows).groupby(["model", "protocol"], sort=False).median().reset_index()
    print(f"\ncell {cell.name} ({cell.slides} slides, D = {cell.feature_dim}), "
          f"{args.threads} thread(s), median over {args.epochs} epochs and {args.repeats} "
          f"run(s), "
          f"{'no cache' if args.no_cache else 'cache as hmil.train decides'}")  # fmt: skip
    print(table.to_markdown(index=False, floatfmt=".2f"))
    cost = table.set_index(["protocol", "model"])["s/epoch"]
    models = list(dict.fromkeys(args.models))
    if {"paper", "default"} <= set(args.protocols):
        for model in models:
            ratio = cost["default", model] / cost["paper", model]
            print(f"{model}: default / paper = {ratio:.2f}× per epoch")
    for protocol in args.protocols:
        for model in models[1:]:
            ratio = cost[protocol, model] / cost[protocol, models[0]]
            print(f"{protocol}: {model} / {models[0]} = {ratio:.2f}× per epoch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
