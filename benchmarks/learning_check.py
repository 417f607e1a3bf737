"""Learning check: HMIL's fine macro AUC beside ABMIL's on a generated hierarchical benchmark.

    python benchmarks/learning_check.py [--hierarchies bracs tiny] [--seeds 0 1 2 3 4 5]
        [--folds 4] [--folds-to-run K] [--epochs 20] [--signal 6] [--fine-offset 0.5]
        [--json OUT]

Bags come from :mod:`hmil.synthetic_features` with its default witness rate: the fine
class shows in 2–10 % of a bag's 50–200 instances (1–20 key instances), and fine classes
of one coarse group differ subtly (``fine_offset``). Default hierarchy: the paper's BRACS
(7 fine classes in groups of 3, 2, 2); ``tiny`` (2 × 2) is the smallest one with shared
groups. For each cohort seed the bags are dealt, per class, into K folds; fold k tests on
part k, validates on part k+1 and trains on the rest (the same DATA_SPLIT.csv for every
model). Every model is trained by ``hmil.train``'s ``main`` under the same settings and
seed (the cohort seed), and scored on its test part.

Printed per hierarchy: fine macro AUC per seed and fold, per model, and HMIL − ABMIL; the
mean over runs; the pooled out-of-fold AUC per seed. ``tests/hmil/test_learning_check.py``
runs a small version (BRACS, same cohort and training settings, fold 0 of 4 seeds).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.metrics import roc_auc_score

from hmil.hierarchy import Hierarchy
from hmil.synthetic_features import SyntheticConfig, generate_cohort, write_cohort
from hmil.train import main as train_main
from hmil.training import load_hierarchy

# Two coarse groups of two fine classes: the smallest hierarchy with fine classes that
# share a coarse group (the subtle distinction) and groups that differ (the easy one).
TINY_HIERARCHY = {
    "name": "tiny",
    "coarse": ["A", "B"],
    "fine": {"a1": "A", "a2": "A", "b1": "B", "b2": "B"},
}

# The benchmark's difficulty, on top of the generator's defaults (2–10 % key instances of
# 50–200 per bag): key instances sit 6 noise-σ from the origin, and the fine classes of a
# group are 0.63·6 ≈ 3.8 σ apart (cosine 0.8 between their means) while groups are
# orthogonal. With 20 bags per class (10 to train on per fold) ABMIL's fine macro AUC on
# BRACS lands around 0.9–1.0 for most seeds: learnable, not trivial.
COHORT = SyntheticConfig(bags_per_class=20, feature_dim=32, signal=6.0, fine_offset=0.5)


@dataclass(frozen=True)
class TrainSettings:
    """Trainer options shared by every model of the check (``hmil.train`` flags).

    The cosine schedule, not the trainer's default ReduceLROnPlateau: the plateau scheduler
    watches the validation *total* loss, and HMIL's total rises by design as the
    contrastive weight 1 − α(e) and its scale τ(e)/0.1 grow (here 1.8 → 31 over 20
    epochs), so it cuts HMIL's lr tenfold every 6 epochs whatever HMIL learns (at lr 1e-4
    over 60 epochs: 1e-8 by epoch 30), while ABMIL's total is its fine CE. Cosine treats
    both models alike.
    """

    epochs: int = 20
    lr: float = 1e-3
    batch_bags: int = 8
    patience: int = 20
    scheduler: str = "cosine"


@dataclass
class CheckResult:
    """Test fine macro AUC per (seed, fold) and model, and the pooled out-of-fold AUC."""

    models: tuple[str, ...]
    runs: pd.DataFrame  # columns: seed, fold, <model>...
    pooled: pd.DataFrame  # columns: seed, <model>...
    settings: dict = field(default_factory=dict)

    def mean_auc(self, model: str) -> float:
        return float(self.runs[model].mean())


def hierarchy_spec(spec: str, directory: Path) -> str:
    """``--hierarchy`` for hmil.train: ``tiny`` is written as YAML into ``directory``;
    a preset name or a YAML path is passed on as it is."""
    if spec != "tiny":
        return spec
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_HIERARCHY, sort_keys=False))
    return str(path)


def fold_splits(table: pd.DataFrame, folds: int) -> pd.DataFrame:
    """DATA_SPLIT table: per class, bags (already in random order) dealt round-robin into
    ``folds`` parts; fold k tests on part k, validates on part k+1, trains on the rest."""
    if folds < 3:
        raise ValueError("need at least 3 folds (test, val and train parts)")
    part = table.groupby("label").cumcount().to_numpy() % folds
    splits = table.copy()
    for fold in range(folds):
        splits[f"fold{fold}"] = np.where(
            part == fold, "test", np.where(part == (fold + 1) % folds, "val", "train")
        )
    return splits


def fine_macro_auc(predictions: pd.DataFrame, hierarchy: Hierarchy) -> float:
    labels = predictions["fine_label"].map(hierarchy.fine_index).to_numpy()
    probs = predictions[[f"p_fine_{name}" for name in hierarchy.fine]].to_numpy()
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def run_learning_check(
    seeds: list[int],
    folds: int,
    workdir: Path,
    *,
    models: tuple[str, ...] = ("hmil", "abmil"),
    hierarchy: str = "bracs",
    cohort: SyntheticConfig = COHORT,
    settings: TrainSettings = TrainSettings(),
    folds_to_run: int | None = None,
    progress: bool = True,
) -> CheckResult:
    """Train every model on folds 0..folds_to_run-1 of one generated cohort per seed.

    The cohort seed is also the training seed, so each (seed, fold) is one paired run:
    same bags, same split, same initial RNG state for every model.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    hierarchy_arg = hierarchy_spec(hierarchy, workdir)
    resolved = load_hierarchy(hierarchy_arg)
    runs, pooled = [], []
    for seed in seeds:
        root = workdir / f"seed{seed}"
        generated = generate_cohort(resolved, replace(cohort, seed=seed))
        write_cohort(generated, root / "features")
        fold_splits(generated.table, folds).to_csv(root / "DATA_SPLIT.csv", index=False)
        test_predictions: dict[str, list[pd.DataFrame]] = {model: [] for model in models}
        for fold in range(folds_to_run or folds):
            row = {"seed": seed, "fold": fold}
            for model in models:
                started = time.perf_counter()
                out = root / f"{model}_fold{fold}"
                code = train_main(
                    [
                        "--features", str(root / "features"),
                        "--splits", str(root / "DATA_SPLIT.csv"),
                        "--fold", str(fold),
                        "--model", model,
                        "--hierarchy", hierarchy_arg,
                        "--out", str(out),
                        "--epochs", str(settings.epochs),
                        "--lr", str(settings.lr),
                        "--batch-bags", str(settings.batch_bags),
                        "--patience", str(settings.patience),
                        "--scheduler", settings.scheduler,
                        "--seed", str(seed),
                    ]
                )  # fmt: skip
                if code != 0:
                    raise RuntimeError(f"hmil.train failed for {model}, seed {seed}, fold {fold}")
                predictions = pd.read_csv(out / "predictions.csv")
                test = predictions[predictions["split"] == "test"]
                test_predictions[model].append(test)
                row[model] = fine_macro_auc(test, resolved)
                if progress:
                    print(
                        f"  seed {seed} fold {fold} {model:<6} fine AUC {row[model]:.3f} "
                        f"({time.perf_counter() - started:.1f} s)",
                        flush=True,
                    )
            runs.append(row)
        pooled.append(
            {"seed": seed}
            | {
                model: fine_macro_auc(pd.concat(test_predictions[model]), resolved)
                for model in models
            }
        )
    return CheckResult(
        models=tuple(models),
        runs=pd.DataFrame(runs),
        pooled=pd.DataFrame(pooled),
        settings={"cohort": asdict(cohort), "train": asdict(settings), "hierarchy": hierarchy},
    )


def format_result(result: CheckResult) -> str:
    """The per-run table and the summary, HMIL beside ABMIL (first model minus the last)."""
    first, last = result.models[0], result.models[-1]
    runs = result.runs.copy()
    runs[f"{first}−{last}"] = runs[first] - runs[last]
    pooled = result.pooled.copy()
    pooled[f"{first}−{last}"] = pooled[first] - pooled[last]
    difference = runs[f"{first}−{last}"]
    lines = ["test fine macro AUC per seed and fold:"]
    lines += [runs.to_string(index=False, float_format="{:.3f}".format), ""]
    if len(runs) > len(pooled):  # several folds per seed
        lines += ["pooled out-of-fold fine macro AUC per seed:"]
        lines += [pooled.to_string(index=False, float_format="{:.3f}".format), ""]
    lines += [
        "mean over runs: "
        + ", ".join(
            f"{model} {runs[model].mean():.3f} ± {runs[model].std(ddof=0):.3f}"
            for model in result.models
        ),
        f"{first} − {last}: mean {difference.mean():+.3f}, min {difference.min():+.3f}, "
        f"max {difference.max():+.3f}; {first} ≥ {last} in {(difference >= 0).sum()} of "
        f"{len(difference)} runs",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--folds-to-run", type=int, help="train folds 0..K-1 only (default all)")
    parser.add_argument("--models", nargs="+", default=["hmil", "abmil"])
    parser.add_argument(
        "--hierarchies",
        nargs="+",
        default=["bracs", "tiny"],
        help="each: tiny, a preset name or a YAML",
    )
    parser.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--batch-bags", type=int, default=TrainSettings.batch_bags)
    parser.add_argument("--patience", type=int, default=TrainSettings.patience)
    parser.add_argument(
        "--scheduler", choices=("cosine", "plateau"), default=TrainSettings.scheduler
    )
    parser.add_argument("--bags-per-class", type=int, default=COHORT.bags_per_class)
    parser.add_argument("--feature-dim", type=int, default=COHORT.feature_dim)
    parser.add_argument("--min-instances", type=int, default=COHORT.min_instances)
    parser.add_argument("--max-instances", type=int, default=COHORT.max_instances)
    parser.add_argument("--min-key-fraction", type=float, default=COHORT.min_key_fraction)
    parser.add_argument("--max-key-fraction", type=float, default=COHORT.max_key_fraction)
    parser.add_argument("--signal", type=float, default=COHORT.signal)
    parser.add_argument("--fine-offset", type=float, default=COHORT.fine_offset)
    parser.add_argument("--workdir", type=Path, help="keep the cohorts and runs here")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.disable(logging.WARNING)  # one line per run is enough; hmil.train logs a lot
    torch.set_num_threads(1)  # tiny matrices: more threads only add overhead
    cohort = replace(
        COHORT,
        bags_per_class=args.bags_per_class,
        feature_dim=args.feature_dim,
        min_instances=args.min_instances,
        max_instances=args.max_instances,
        min_key_fraction=args.min_key_fraction,
        max_key_fraction=args.max_key_fraction,
        signal=args.signal,
        fine_offset=args.fine_offset,
    )
    settings = TrainSettings(
        epochs=args.epochs,
        lr=args.lr,
        batch_bags=args.batch_bags,
        patience=args.patience,
        scheduler=args.scheduler,
    )
    print(f"cohort {asdict(cohort)}\ntraining {asdict(settings)}, {args.folds} folds", flush=True)
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for hierarchy in args.hierarchies:
            print(f"\n== hierarchy {hierarchy}", flush=True)
            results[hierarchy] = run_learning_check(
                args.seeds,
                args.folds,
                (args.workdir or Path(scratch)) / Path(hierarchy).stem,
                models=tuple(args.models),
                hierarchy=hierarchy,
                cohort=cohort,
                settings=settings,
                folds_to_run=args.folds_to_run,
            )
    for hierarchy, result in results.items():
        print(f"\n== hierarchy {hierarchy}\n{format_result(result)}")
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        payload = {
            hierarchy: {
                "settings": result.settings,
                "runs": result.runs.to_dict(orient="records"),
                "pooled": result.pooled.to_dict(orient="records"),
            }
            for hierarchy, result in results.items()
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
