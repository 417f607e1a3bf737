"""Learning check: every model at the workflow's default training settings on a grid of
generated hierarchical cohorts; HMIL beside ABMIL, paired.

    python benchmarks/learning_check.py [--full] [--cells middle ...] [--models hmil abmil ...]
        [--seeds 0 1 2 3 4] [--folds 3] [--config config/config.yaml] [--json OUT]

Training settings come from the ``training`` section of ``--config`` (the shipped
config/config.yaml by default), turned into ``hmil.train`` flags exactly as the workflow's
``training_arguments`` does: no per-model or per-cell tuning. Cohorts come from
:mod:`hmil.data.synthetic` (BRACS hierarchy: 7 fine classes in groups of 3, 2, 2; the
fine class shows in a few key instances of each bag; fine classes of one group differ
subtly). Each cell is a cohort recipe; each seed draws a cohort, deals its patients, per
class, into K parts, and fold k tests on part k, validates on part k+1 and trains on the
rest, the same DATA_SPLIT.csv for every model. The cohort seed is the training seed, so
each (cell, seed, fold) is one paired run across models.

Model names: a registered model, or ``model:<loss preset>`` for an ablation: the preset's
fields on top of the model's own loss (``hmil:flat`` is the HMIL architecture on fine CE
alone, ``hmil_mb:hmil`` hmil_mb with the method's whole loss, contrastive term included).

Printed per cell: test fine and coarse-from-fine macro-AUC (mean ± SD over runs) per model,
the paired HMIL − ABMIL difference with a 95 % t-interval, whether the paper's ablation
ordering (full > each alignment ablation > flat) holds in the means, the share of runs
flagged by the trainer's learning warnings, and the lowest lr before E/2 as a fraction of
the peak. ``tests/hmil/test_learning_check.py`` trains fold 0 of seed 0 of ``small_d64``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import yaml
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from hmil.data.hierarchy import Hierarchy, load_hierarchy
from hmil.data.synthetic import SyntheticConfig, generate_cohort, write_cohort
from hmil.train import main as train_main
from hmil.training.settings import SETTING_NAMES, flag, setting_flags

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "config.yaml"
HIERARCHY = "bracs"  # of the cells that name no other

#: training-section keys that become hmil.train flags (hmil/training/settings.py; the
#: workflow's training_arguments passes them the same way); the others (threads, device,
#: ...) place the job.
TRAINING_FLAGS = ("protocol", *SETTING_NAMES)


@dataclass(frozen=True)
class Cell:
    """One cohort recipe of the grid (a hierarchy preset; balanced unless ``class_counts``)."""

    name: str
    slides: int  # about: bags_per_class = slides // C_f
    feature_dim: int
    min_instances: int
    max_instances: int
    min_key_fraction: float
    max_key_fraction: float
    signal: float  # key-instance distance from the origin, in noise SDs
    fine_offset: float  # fine classes of one group: cosine 1/(1 + offset²) between means
    slides_per_patient: int = 2
    hierarchy: str = "bracs"
    class_counts: tuple[int, ...] | None = None  # slides per fine class (real proportions)
    slide_shift: float = 0.0  # each slide's shared offset, as a fraction of the signal

    def cohort(self, seed: int) -> SyntheticConfig:
        num_fine = load_hierarchy(self.hierarchy).num_fine
        return SyntheticConfig(
            bags_per_class=self.class_counts or max(1, self.slides // num_fine),
            feature_dim=self.feature_dim,
            min_instances=self.min_instances,
            max_instances=self.max_instances,
            min_key_fraction=self.min_key_fraction,
            max_key_fraction=self.max_key_fraction,
            signal=self.signal,
            fine_offset=self.fine_offset,
            slides_per_patient=self.slides_per_patient,
            slide_shift=self.slide_shift,
            seed=seed,
        )


# Fixed before the grid ran (seed 0 of middle and small_d64 served to choose the default
# protocol's lr and regularisation; nothing was tuned per model or per cell). The middle
# cell: 300 slides (2 per patient), D = 256, 50–300 instances of which 2–10 % carry the
# class, key instances 4 noise-SDs out (the generator's default), fine classes of a group
# at cosine 0.8 (offset 0.5). Weak and strong fine signal move only the fine offset
# (cosine 0.92 and 0.61); the others move one axis each: fewer key instances, smaller and
# larger cohorts, other D, larger bags.
MIDDLE = Cell("middle", 300, 256, 50, 300, 0.02, 0.10, 4.0, 0.5)
SMALL_D64 = replace(MIDDLE, name="small_d64", slides=150, feature_dim=64)
# Cohorts like real ones, each one axis away from small_d64: a slide-level shift (stain,
# scanner, site: one offset per slide, half or as large as the key-instance signal), and
# real class proportions: BRACS's 545 slides (several per patient) and PANDA's ISUP grades
# (27/26/13/12/12/11 %) scaled to 303 biopsies, one per patient, on the panda hierarchy.
SHIFT_HALF = replace(SMALL_D64, name="shift_half", slide_shift=0.5)
SHIFT_EQUAL = replace(SMALL_D64, name="shift_equal", slide_shift=1.0)
BRACS_LIKE = replace(
    SMALL_D64, name="bracs_like", slides=545, class_counts=(43, 147, 73, 41, 48, 61, 132),
    slides_per_patient=3,
)  # fmt: skip
PANDA_LIKE = replace(
    SMALL_D64, name="panda_like", slides=303, hierarchy="panda",
    class_counts=(81, 78, 39, 36, 36, 33), slides_per_patient=1,
)  # fmt: skip
# The small grid is what a 2-core CPU trains in a working session with --jobs 2
# (benchmarks/README.md "Learning check" gives the seeds and the minutes); --full adds the
# other axes.
SMALL_GRID = (SMALL_D64, MIDDLE, SHIFT_HALF, SHIFT_EQUAL, BRACS_LIKE, PANDA_LIKE)
FULL_GRID = (
    *SMALL_GRID,
    replace(MIDDLE, name="weak_fine", fine_offset=0.3),
    replace(MIDDLE, name="strong_fine", fine_offset=0.8),
    replace(MIDDLE, name="rare_keys", min_key_fraction=0.01, max_key_fraction=0.03),
    replace(MIDDLE, name="large_600", slides=600),
    replace(MIDDLE, name="d1024", feature_dim=1024),
    replace(MIDDLE, name="big_bags", min_instances=500, max_instances=2000),
)
CELLS = {cell.name: cell for cell in FULL_GRID}
# What the hierarchy adds to hmil_mb's readout: the same model on fine CE alone (flat),
# without each alignment, and with the contrastive term that its own loss leaves out
# (hmil_mb:hmil, the method's whole loss); clam_mb has class rows with their own
# classifiers and no hierarchy; abmil and hmil (the authors' model) are the references.
SMALL_MODELS = (
    "hmil_mb", "hmil_mb:flat", "hmil_mb:no_instance_alignment", "hmil_mb:no_bag_alignment",
    "hmil_mb:hmil", "clam_mb", "abmil", "hmil",
)  # fmt: skip
FULL_MODELS = (*SMALL_MODELS, "clam_sb", "transmil", "hmil_mb:fixed_weights", "hmil:flat")
#: The model each paired line compares, and what against.
PAIRS = (("hmil_mb", "abmil"), ("hmil_mb", "hmil_mb:flat"), ("hmil_mb", "clam_mb"),
         ("hmil", "abmil"))  # fmt: skip


def training_flags(config_path: Path = CONFIG) -> list[str]:
    """hmil.train flags of the config's training section, as the workflow passes them."""
    training = (yaml.safe_load(Path(config_path).read_text()) or {}).get("training") or {}
    return setting_flags(training)


def fold_splits(table: pd.DataFrame, folds: int, val_every: int = 5) -> pd.DataFrame:
    """DATA_SPLIT table, patient-grouped and stratified as hmil.splits makes it: per class,
    patients (in the cohort's random order) are dealt round-robin into ``folds`` parts;
    fold k tests on part k, and of the other patients of each class every ``val_every``-th
    validates (≈ 20 %, the workflow's val_fraction), the rest train."""
    if folds < 2:
        raise ValueError("need at least 2 folds")
    patients = table.drop_duplicates("patient_id").reset_index(drop=True)
    rank = patients.groupby("label").cumcount().to_numpy()
    part = dict(zip(patients["patient_id"], rank % folds, strict=True))
    rank_of = dict(zip(patients["patient_id"], rank, strict=True))
    patient_part = table["patient_id"].map(part).to_numpy()
    patient_rank = table["patient_id"].map(rank_of).to_numpy()
    splits = table.copy()
    for fold in range(folds):
        # rank among this class's non-test patients decides val, so each fold validates
        # on about 1/val_every of its training patients
        rest_rank = patient_rank - (patient_rank // folds) - (patient_rank % folds > fold)
        is_val = (patient_part != fold) & (rest_rank % val_every == val_every - 1)
        splits[f"fold{fold}"] = np.where(
            patient_part == fold, "test", np.where(is_val, "val", "train")
        )
    return splits


def macro_auc(predictions: pd.DataFrame, labels: pd.Series, prefix: str, names) -> float:
    probs = predictions[[f"{prefix}{name}" for name in names]].to_numpy()
    return float(
        roc_auc_score(
            labels.to_numpy(), probs, multi_class="ovr", average="macro",
            labels=np.arange(len(names)),
        )
    )  # fmt: skip


def fine_decisions(predictions: pd.DataFrame, hierarchy: Hierarchy) -> dict[str, float]:
    """Fine balanced accuracy and macro-F1 of the argmax decision (every fine class counts
    once, so a rare class weighs as much as a common one)."""
    truth = predictions["fine_label"].map(hierarchy.fine_index).to_numpy()
    probs = predictions[[f"p_fine_{name}" for name in hierarchy.fine]].to_numpy()
    decision = probs.argmax(axis=1)
    return {
        "fine_balanced_accuracy": float(balanced_accuracy_score(truth, decision)),
        "fine_macro_f1": float(
            f1_score(truth, decision, average="macro", labels=np.arange(hierarchy.num_fine),
                     zero_division=0.0)
        ),
    }  # fmt: skip


def key_attention(out: Path, key_instances: dict[str, np.ndarray], hierarchy) -> dict:
    """Mean attention mass on the key instances (where the class signal is) over the test
    bags: of the fine attention row of the true fine class (the only row for flat
    models), of the other fine rows (class-wise models: a row that is class-specific
    puts less there than the true row), and of the coarse row of the true coarse class
    (hierarchical models). Chance: the key fraction, 2–10 %."""
    fine_mass, other_mass, coarse_mass = [], [], []
    with h5py.File(out / "attention.h5", "r") as file:
        fine_rows = file.attrs.get("fine_attention_rows") == "class"
        for slide_id in file:
            fine_label, coarse_label, keys = key_instances[slide_id]
            group = file[slide_id]
            on_keys = group["fine_attention"][()][:, keys].sum(axis=1)
            fine_mass.append(float(on_keys[fine_label if fine_rows else 0]))
            if fine_rows:
                other_mass.append(float(np.delete(on_keys, fine_label).mean()))
            if "coarse_attention" in group:
                coarse_mass.append(float(group["coarse_attention"][()][coarse_label][keys].sum()))
    return {
        "fine_key_attention": float(np.mean(fine_mass)),
        "other_rows_key_attention": float(np.mean(other_mass)) if other_mass else math.nan,
        "coarse_key_attention": float(np.mean(coarse_mass)) if coarse_mass else math.nan,
    }


def run_scores(out: Path, hierarchy: Hierarchy) -> dict[str, float]:
    """Test fine and coarse-from-fine macro-AUC of one run, its best epoch, whether the
    trainer warned, whether its models centred each slide (``slide_norm``, as chosen for
    the fold), and its lowest lr before E/2 as a fraction of the peak."""
    predictions = pd.read_csv(out / "predictions.csv")
    test = predictions[predictions["split"] == "test"]
    metrics = json.loads((out / "metrics.json").read_text())
    history = pd.read_csv(out / "log.csv")
    epochs = metrics["config"]["epochs"]
    first_half = history.loc[history["epoch"] < epochs / 2, "lr"]
    return {
        "fine_auc": macro_auc(
            test, test["fine_label"].map(hierarchy.fine_index), "p_fine_", hierarchy.fine
        ),
        "coarse_from_fine_auc": macro_auc(
            test,
            test["coarse_label"].map(hierarchy.coarse_index),
            "p_coarse_from_fine_",
            hierarchy.coarse,
        ),
        **fine_decisions(test, hierarchy),
        "best_epoch": metrics["best_epoch"],
        "epochs_trained": metrics["epochs_trained"],
        "warned": bool(metrics.get("learning_warnings")),
        "centred": metrics.get("slide_norm", {}).get("mode", "none") != "none",
        "min_lr_ratio_first_half": float(first_half.min() / metrics["config"]["lr"]),
    }


def variant_flags(variant: str) -> list[str]:
    """``key=value,key=value`` (training-section keys) as hmil.train flags."""
    flags = []
    for item in filter(None, variant.split(",")):
        key, _, value = item.partition("=")
        if key not in TRAINING_FLAGS or not value:
            raise ValueError(f"variant {variant!r}: expected training keys as key=value")
        flags += [flag(key), value]
    return flags


def train_one(model: str, run: Run, flags: list[str]):
    """Trains ``model`` (``name[:loss preset][+variant]``) on the run's fold."""
    spec, _, variant = model.partition("+")
    name, _, preset = spec.partition(":")
    root = run.root
    args = [
        "--features", str(root / "features"), "--splits", str(root / "DATA_SPLIT.csv"),
        "--fold", str(run.fold), "--model", name, "--hierarchy", run.hierarchy,
        "--out", str(run.out), "--seed", str(run.seed), *flags, *variant_flags(variant),
    ]  # fmt: skip
    if preset:
        args += ["--loss-preset", preset]
    if train_main(args) != 0:
        raise RuntimeError(f"hmil.train failed: {' '.join(args)}")


def prepare_cohort(cell: Cell, seed: int, folds: int, workdir: Path, hierarchy) -> dict:
    """Writes one (cell, seed) cohort, its DATA_SPLIT.csv and keys.npz (each slide's key
    instance mask, for later diagnostics); returns its key instances per slide as (fine
    index, coarse index, key mask)."""
    root = Path(workdir) / cell.name / f"seed{seed}"
    generated = generate_cohort(hierarchy, cell.cohort(seed))
    write_cohort(generated, root / "features")
    fold_splits(generated.table, folds).to_csv(root / "DATA_SPLIT.csv", index=False)
    rows = list(zip(generated.table.itertuples(), generated.key_instances, strict=True))
    temporary = root / f"keys.tmp-{os.getpid()}.npz"
    np.savez_compressed(temporary, **{row.slide_id: key for row, key in rows})
    os.replace(temporary, root / KEYS_FILE)
    return {
        row.slide_id: (
            hierarchy.fine_index(row.label),
            hierarchy.coarse_index(row.coarse_label),
            key,
        )
        for row, key in rows
    }


#: A cohort's key-instance masks, slide id → bool [N], next to its DATA_SPLIT.csv.
KEYS_FILE = "keys.npz"


@dataclass(frozen=True)
class Run:
    """One training run of the grid: (cell, seed, fold, model)."""

    cell: str
    seed: int
    fold: int
    model: str
    root: Path
    hierarchy: str = "bracs"

    @property
    def out(self) -> Path:
        name = self.model.replace(":", "-").replace("+", "_").replace("=", "-")
        return self.root / f"{name.replace(',', '_')}_fold{self.fold}"


def score_run(run: Run, flags: list[str], keys: dict) -> dict:
    """Trains one run and returns its row (scores, key attention, seconds). Each run seeds
    itself, so its row does not depend on what else runs, or in which process."""
    hierarchy = load_hierarchy(run.hierarchy)
    started = time.perf_counter()
    train_one(run.model, run, flags)
    row = {"cell": run.cell, "seed": run.seed, "fold": run.fold, "model": run.model}
    row |= run_scores(run.out, hierarchy) | key_attention(run.out, keys, hierarchy)
    row["seconds"] = time.perf_counter() - started
    return row


def quiet_worker() -> None:
    """A grid process: one torch thread (small matrices: more only add overhead), and one
    line per run instead of hmil.train's log."""
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)


def run_grid(
    cells: list[Cell],
    models: list[str],
    seeds: list[int],
    folds: int,
    workdir: Path,
    *,
    flags: list[str] | None = None,
    folds_to_run: int | None = None,
    progress: bool = True,
    partial: Path | None = None,
    jobs: int = 1,
    reuse: list[dict] | None = None,
    train: bool = True,
) -> pd.DataFrame:
    """One row per (cell, seed, fold, model) with the scores of :func:`run_scores` (and
    :func:`key_attention`), in that order whatever ``jobs`` (runs trained at once, each in
    its own process on one thread); ``partial`` is rewritten with the rows so far after
    each run, so an interrupted grid still leaves its results; a run found in ``reuse``
    (rows of an earlier grid made with the same ``flags``) is taken from there, not trained:
    each run seeds itself, so it would give the same row. ``train=False`` trains nothing:
    the rows are those of ``reuse`` that belong to the grid."""
    flags = training_flags() if flags is None else flags
    runs, keys = [], {}
    for cell in cells:
        hierarchy = load_hierarchy(cell.hierarchy)
        for seed in seeds:
            root = Path(workdir) / cell.name / f"seed{seed}"
            if train:
                keys[root] = prepare_cohort(cell, seed, folds, workdir, hierarchy)
            runs += [
                Run(cell.name, seed, fold, model, root, cell.hierarchy)
                for fold in range(folds_to_run or folds)
                for model in models
            ]
    rows = []
    earlier = {(row["cell"], row["seed"], row["fold"], row["model"]): row for row in reuse or []}

    def record(row: dict) -> None:
        rows.append(row)
        if partial is not None:
            partial.write_text(json.dumps(rows, indent=1) + "\n")
        if progress:
            print(
                f"  {row['cell']} seed {row['seed']} fold {row['fold']} {row['model']:<28} "
                f"fine {row['fine_auc']:.3f} coarse {row['coarse_from_fine_auc']:.3f} "
                f"best epoch {row['best_epoch']:>3} ({row['seconds']:.0f} s)",
                flush=True,
            )

    for run in [run for run in runs if (run.cell, run.seed, run.fold, run.model) in earlier]:
        record(earlier[run.cell, run.seed, run.fold, run.model])
    runs_left = [run for run in runs if (run.cell, run.seed, run.fold, run.model) not in earlier]
    if not train:
        runs, runs_left = [run for run in runs if run not in runs_left], []
    if jobs <= 1:
        for run in runs_left:
            record(score_run(run, flags, keys[run.root]))
    else:
        # spawn: a forked child would inherit torch's thread pool state
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=quiet_worker) as pool:
            pending = [pool.submit(score_run, run, flags, keys[run.root]) for run in runs_left]
            for future in as_completed(pending):
                record(future.result())
    order = {(run.cell, run.seed, run.fold, run.model): i for i, run in enumerate(runs)}
    rows.sort(key=lambda row: order[row["cell"], row["seed"], row["fold"], row["model"]])
    return pd.DataFrame(rows)


def paired_difference(runs: pd.DataFrame, first: str, second: str, metric: str) -> dict:
    """Mean of first − second over paired (cell, seed, fold) runs, with a 95 % t-interval."""
    wide = runs.pivot_table(index=["cell", "seed", "fold"], columns="model", values=metric)
    if first not in wide or second not in wide:
        return {}
    difference = (wide[first] - wide[second]).dropna()
    n = len(difference)
    mean = float(difference.mean())
    if n < 2:
        wins = int((difference >= 0).sum())
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": n, "wins": wins}
    half = float(stats.t.ppf(0.975, n - 1) * difference.std(ddof=1) / math.sqrt(n))
    return {
        "mean": mean, "low": mean - half, "high": mean + half, "n": n,
        "wins": int((difference >= 0).sum()),
    }  # fmt: skip


def ablation_ordering(means: pd.Series, full: str = "hmil_mb") -> str:
    """Whether full > each alignment ablation > flat holds in the means (the paper's)."""
    if full not in means or f"{full}:flat" not in means:
        return "n/a"
    ablations = (f"{full}:no_instance_alignment", f"{full}:no_bag_alignment")
    middle = [means[name] for name in ablations if name in means]
    chain = [means[full], *middle, means[f"{full}:flat"]]
    full_best = all(means[full] > value for value in chain[1:])
    flat_worst = all(value > means[f"{full}:flat"] for value in chain[:-1])
    return "holds" if full_best and flat_worst else "does not hold"


METRICS = (
    ("fine_auc", "fine AUC"),
    ("coarse_from_fine_auc", "coarse-from-fine AUC"),
    ("fine_balanced_accuracy", "fine balanced accuracy"),
    ("fine_macro_f1", "fine macro-F1"),
)


def centred_text(group: pd.DataFrame) -> str:
    """How many of the runs centred each slide; runs recorded before this was kept: –."""
    if "centred" not in group or group["centred"].isna().any():
        return "–"
    return f"{int(group['centred'].sum())}/{len(group)}"


def format_grid(runs: pd.DataFrame) -> str:
    """Markdown table per cell and model, then the paired lines of each cell and of all."""
    lines = [
        "| cell | model | runs | " + " | ".join(label for _, label in METRICS)
        + " | warned | centred | best epoch (median) | attention on key instances |",
        "|---|---|---|" + "---|" * len(METRICS) + "---|---|---|---|",
    ]  # fmt: skip
    notes = []
    for cell, table in runs.groupby("cell", sort=False):
        for model, group in table.groupby("model", sort=False):
            scores = " | ".join(mean_sd(group[metric]) for metric, _ in METRICS if metric in group)
            lines.append(
                f"| {cell} | {model} | {len(group)} | {scores} | "
                f"{int(group['warned'].sum())}/{len(group)} | {centred_text(group)} | "
                f"{group['best_epoch'].median():.0f} | {attention_text(group)} |"
            )
        notes.append(cell_summary(cell, table))
    notes.append(cell_summary("all cells", runs))
    return "\n".join([*lines, "", *notes])


def mean_sd(values: pd.Series) -> str:
    """mean ± sample SD, or the value alone for one run."""
    if len(values) < 2:
        return f"{values.mean():.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def attention_text(group: pd.DataFrame) -> str:
    """Mean attention mass on key instances: fine row of the true class (other fine rows,
    class-wise models; coarse row, hierarchical models)."""
    if "fine_key_attention" not in group:
        return "–"
    text = f"{group['fine_key_attention'].mean():.2f}"
    columns = {"other rows": "other_rows_key_attention", "coarse": "coarse_key_attention"}
    extra = [
        f"{label} {value:.2f}"
        for label, column in columns.items()
        if column in group and not math.isnan(value := group[column].mean())
    ]
    return f"{text} ({', '.join(extra)})" if extra else text


def comparisons(models) -> list[tuple[str, str]]:
    """The pairs of :data:`PAIRS` that ran, and each variant against its model's baseline."""
    models = set(models)
    pairs = [(first, second) for first, second in PAIRS if {first, second} <= models]
    pairs += [
        (model, model.partition("+")[0])
        for model in sorted(models)
        if "+" in model and model.partition("+")[0] in models
    ]
    return pairs


def cell_summary(cell: str, table: pd.DataFrame) -> str:
    parts = []
    for first, second in comparisons(table["model"].unique()):
        texts = []
        for metric, label in METRICS:
            difference = paired_difference(table, first, second, metric)
            if difference:
                texts.append(
                    f"{label} {difference['mean']:+.3f} "
                    f"[{difference['low']:+.3f}, {difference['high']:+.3f}]"
                )
        wins = paired_difference(table, first, second, "fine_auc")
        if texts:
            parts.append(
                f"{first} − {second}: " + ", ".join(texts)
                + f" (fine AUC ≥ in {wins['wins']}/{wins['n']})"
            )  # fmt: skip
    parts.append(
        f"ablation ordering {ablation_ordering(table.groupby('model')['fine_auc'].mean())}"
    )
    if len(parts) == 1:
        parts.insert(0, "no pairs")
    return f"- {cell}:\n  - " + "\n  - ".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="all cells and models")
    parser.add_argument("--cells", nargs="+", choices=sorted(CELLS), help="default: small grid")
    parser.add_argument(
        "--models", nargs="+",
        help="name[:loss preset][+key=value,...] (default: the 8 attribution models)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", nargs="+", default=[],
        help="also train every model with these training settings, e.g. slide_norm=center "
        "balanced_sampling=true; each is paired with the model at the config's settings",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", nargs="+", type=int,
        help="default: 0 (the small grid: 144 runs, 42 minutes at --jobs 2 on 2 cores); "
        "0 1 2 3 4 with --full",
    )  # fmt: skip
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--folds-to-run", type=int, help="train folds 0..K-1 only (default all)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="its training section")
    parser.add_argument("--workdir", type=Path, help="keep the cohorts and runs here")
    parser.add_argument("--json", type=Path, help="also write every run's scores here")
    parser.add_argument(
        "--reuse", type=Path, nargs="+", default=[],
        help="--json files (or their .partial.json) of earlier grids: their runs with the same "
        "training flags are not trained again",
    )  # fmt: skip
    parser.add_argument(
        "--report-only", action="store_true",
        help="train nothing: the tables of the --reuse runs that belong to the grid",
    )  # fmt: skip
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1,
        help="runs trained at once, one process and one thread each (default: the CPU count)",
    )  # fmt: skip
    return parser.parse_args(argv)


def reused_rows(paths: list[Path], flags: list[str]) -> list[dict]:
    """Rows of earlier grids' JSON files (a finished grid's payload, or the bare list of a
    .partial.json); a finished grid made with other flags is refused."""
    rows = []
    for path in paths:
        payload = json.loads(Path(path).read_text())
        if isinstance(payload, dict):
            if payload["flags"] != flags:
                raise SystemExit(f"{path}: made with flags {payload['flags']}, not {flags}")
            payload = payload["runs"]
        rows += payload
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_worker()
    cells = [CELLS[name] for name in args.cells] if args.cells else (
        list(FULL_GRID) if args.full else list(SMALL_GRID)
    )  # fmt: skip
    models = args.models or list(FULL_MODELS if args.full else SMALL_MODELS)
    for variant in args.variants:
        variant_flags(variant)  # a bad variant fails now, not after the first runs
    models += [f"{model}+{variant}" for variant in args.variants for model in list(models)]
    seeds = args.seeds or ([0, 1, 2, 3, 4] if args.full else [0])
    flags = training_flags(args.config)
    print(f"training flags (from {args.config}): {' '.join(flags)}", flush=True)
    print(f"cells: {[asdict(cell) for cell in cells]}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        runs = run_grid(
            cells, models, seeds, args.folds, args.workdir or Path(scratch),
            flags=flags, folds_to_run=args.folds_to_run, jobs=args.jobs,
            partial=args.json.with_suffix(".partial.json") if args.json else None,
            reuse=reused_rows(args.reuse, flags), train=not args.report_only,
        )  # fmt: skip
    print("\n" + format_grid(runs))
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        payload = {
            "flags": flags,
            "config": str(args.config),
            "cells": [asdict(cell) for cell in cells],
            "seeds": seeds,
            "folds": args.folds,
            "runs": runs.to_dict(orient="records"),
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
