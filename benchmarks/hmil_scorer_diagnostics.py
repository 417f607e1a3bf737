"""Why HMIL trails ABMIL on the learning check: what its shared fine scorer learned.

    python benchmarks/learning_check.py --cells small_d64 --models hmil --workdir W
    python benchmarks/hmil_scorer_diagnostics.py W [--cell small_d64]

HMIL scores each fine class slot with one shared linear scorer: z_f[k] = w_f · (A_f[k]
H_f) = Σ_n A_f[k, n] s_n with s_n = w_f · H_f[n], a single number per instance. A class's
logit is therefore an attention-weighted mean of one instance score, and the classes
differ only in where their attention rows look; ABMIL instead pools once and classifies
the pooled embedding. For every trained HMIL run under W (the learning check's layout),
this recomputes, on the run's test bags and per fine class: the mean instance score on
that class's key instances in SDs of the bag's background scores (positive: the scorer
ranks them above the background), the attention mass of the true class's row on them,
and that of the other rows. It changes nothing; it reads model.pt files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from hmil.data.hierarchy import load_hierarchy
from hmil.evaluation.fold_models import FoldModel, load_fold_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning_check  # a sibling script, not a package


def bag_statistics(model: FoldModel, bag: torch.Tensor, keys: np.ndarray, label: int) -> dict:
    """Instance scores and fine attention of one bag; ``keys`` masks its key instances."""
    module = model.module
    with torch.no_grad():
        fine_instances = module.fine_embedding(module.coarse_embedding(bag))
        scores = module.fine_scorer(fine_instances).squeeze(-1).numpy()
        on_keys = module.fine_attention(fine_instances).numpy()[:, keys].sum(axis=1)
    background = scores[~keys]
    return {
        "fine_class": label,
        "key_score_sd": (scores[keys].mean() - background.mean()) / background.std(),
        "true_row_on_keys": on_keys[label],
        "other_rows_on_keys": np.delete(on_keys, label).mean(),
    }


def run_statistics(
    run_dir: Path, features: Path, splits: pd.DataFrame, keys: dict[str, np.ndarray]
) -> pd.DataFrame:
    model = load_fold_model(run_dir, torch.device("cpu"))
    if not isinstance(model, FoldModel):
        raise SystemExit(f"error: {model.describe()}")
    test = splits[splits[f"fold{model.fold}"] == "test"]
    rows = []
    for row in test.itertuples():
        with h5py.File(features / f"{row.slide_id}.h5", "r") as file:
            bag = torch.as_tensor(file["features"][()], dtype=torch.float32)
        label = model.hierarchy.fine_index(row.label)
        rows.append(bag_statistics(model, bag, keys[str(row.slide_id)], label))
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="a learning_check.py --workdir")
    parser.add_argument("--cell", default="small_d64", choices=sorted(learning_check.CELLS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cell = learning_check.CELLS[args.cell]
    hierarchy = load_hierarchy(learning_check.HIERARCHY)
    tables = []
    for seed_dir in sorted((args.workdir / cell.name).glob("seed*")):
        keys_file = seed_dir / learning_check.KEYS_FILE
        if not keys_file.is_file():
            raise SystemExit(f"error: {keys_file} missing; rerun learning_check.py --workdir")
        with np.load(keys_file) as stored:
            keys = {slide_id: stored[slide_id] for slide_id in stored.files}
        splits = pd.read_csv(seed_dir / "DATA_SPLIT.csv")
        for run_dir in sorted(seed_dir.glob("hmil_fold*")):
            if not (run_dir / "metrics.json").is_file():
                print(f"skipped {run_dir}: not finished (no metrics.json)")
                continue
            table = run_statistics(run_dir, seed_dir / "features", splits, keys)
            tables.append(table.assign(run=f"{seed_dir.name}/{run_dir.name}"))
    if not tables:
        raise SystemExit(f"error: no hmil_fold* runs under {args.workdir / cell.name}")
    bags = pd.concat(tables, ignore_index=True)
    per_run_class = bags.groupby(["run", "fine_class"]).mean(numeric_only=True)
    summary = per_run_class.groupby("fine_class").mean()
    summary["runs with key score > 0"] = (
        (per_run_class["key_score_sd"] > 0).groupby("fine_class").mean()
    )
    summary.index = [hierarchy.fine[index] for index in summary.index]
    print(f"{cell.name}: {bags['run'].nunique()} HMIL runs, {len(bags)} test bags")
    print(summary.to_markdown(floatfmt=".2f"))
    above = (per_run_class["key_score_sd"] > 0).groupby("run").sum()
    print(
        f"fine classes whose key instances the scorer ranks above the background, per run: "
        f"median {above.median():.0f} of {len(hierarchy.fine)} (range {above.min()}–{above.max()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
