"""Apply the fold models of one encoder × model to the slides of another sheet.

The core of ``python -m hmil.deploy``: every slide of the sheet whose features can be
used gets each fold model's probabilities and their mean (the ensemble, the prediction
to use), and the folds' attention averaged per patch. Features made another way than the
training features (encoder, weights, dimension, patch size or mpp, as recorded in
``model.pt`` by training and in each features file by extraction) stop the deployment with
one line; a slide without usable features is listed in ``failed_slides.csv`` and the
others go on (strict: it stops). A labelled sheet also gets the metrics, tables, plots
and bootstrap CIs of cross-validation, computed on the ensemble.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from hmil.data.bags import (
    BagError,
    load_bag_features,
)
from hmil.evaluation.deploy_inputs import (
    Cohort,
    DeployConfig,
    DeployError,
    locate_features,
    read_cohort,
)
from hmil.evaluation.ensemble import BagEnsemble, ensemble_bag
from hmil.evaluation.fold_models import FoldModel, UnusableFold, load_fold_models
from hmil.evaluation.outputs import (
    write_outputs,
)
from hmil.evaluation.report import (
    json_safe,
    summary_json,
    summary_markdown,
)
from hmil.evaluation.runs import (
    REQUIRED_COLUMNS,
    Classes,
    Fold,
    MissingFold,
    fold_number_from_path,
    run_identity,
)
from hmil.evaluation.summary import (
    Evaluation,
    evaluate,
    per_class_table,
    summary_rows,
)
from plumbing.atomic import atomic_outputs
from plumbing.provenance import code_version

log = logging.getLogger("hmil.deploy")

SPLIT = "deploy"  #: the `split` value of every row of a deployment's predictions.csv


# ---- prediction ------------------------------------------------------------------------------


def predict_cohort(
    cohort: Cohort, models: list[FoldModel], device: torch.device, strict: bool
) -> dict[str, BagEnsemble]:
    """slide_id → ensemble outputs; a slide whose features cannot be read joins
    ``cohort.failed`` (strict: an error)."""
    membership = models[0].hierarchy.membership_tensor().to(device)
    modules = [m.module for m in models]
    results: dict[str, BagEnsemble] = {}
    rows = cohort.slides.itertuples(index=False)
    for row in tqdm(rows, total=len(cohort.slides), desc="deploy", unit="slide", disable=None):
        try:
            features = load_bag_features(row.path, row.slide_id)
        except BagError as error:
            if strict:
                raise DeployError(str(error)) from None
            log.warning("%s; slide left out", error)
            cohort.failed[row.slide_id] = str(error)
            continue
        results[row.slide_id] = ensemble_bag(modules, features.to(device), membership)
    return results


# ---- tables ----------------------------------------------------------------------------------


def probability_columns(prefix: str, names: tuple[str, ...], values: np.ndarray | None) -> dict:
    if values is None:
        return {f"{prefix}{name}": math.nan for name in names}
    return {f"{prefix}{name}": float(values[i]) for i, name in enumerate(names)}


def prediction_rows(
    cohort: Cohort, results: dict[str, BagEnsemble], models: list[FoldModel]
) -> pd.DataFrame:
    """predictions.csv: per slide the ensemble (``p_*`` columns, ``pred_*`` classes), then
    each fold's probabilities (``fold{k}_p_*``), in the columns of training's
    predictions.csv so that tools reading those read these."""
    hierarchy = models[0].hierarchy
    fine, coarse = hierarchy.fine, hierarchy.coarse
    rows = []
    for slide in cohort.slides.itertuples(index=False):
        if slide.slide_id not in results:
            continue
        result = results[slide.slide_id]
        label = slide.fine_label
        row: dict[str, Any] = {
            "slide_id": slide.slide_id,
            "patient_id": slide.patient_id,
            "split": SPLIT,
            "fine_label": label,
            "coarse_label": hierarchy.coarse_of(label) if label is not None else None,
        }
        row |= probability_columns("p_fine_", fine, result.fine)
        row |= probability_columns("p_coarse_", coarse, result.coarse)
        row |= probability_columns("p_coarse_from_fine_", coarse, result.coarse_from_fine)
        coarse_source = result.coarse if result.coarse is not None else result.coarse_from_fine
        row["pred_fine"] = fine[int(result.fine.argmax())]
        row["pred_coarse"] = coarse[int(coarse_source.argmax())]
        row["pred_coarse_from_fine"] = coarse[int(result.coarse_from_fine.argmax())]
        row["n_patches"] = int(result.fine_attention.shape[1])
        for k, model in enumerate(models):
            prefix = f"fold{model.fold}_"
            row |= probability_columns(f"{prefix}p_fine_", fine, result.fold_fine[k])
            fold_coarse = None if result.fold_coarse is None else result.fold_coarse[k]
            row |= probability_columns(f"{prefix}p_coarse_", coarse, fold_coarse)
            row |= probability_columns(
                f"{prefix}p_coarse_from_fine_", coarse, result.fold_coarse_from_fine[k]
            )
        rows.append(row)
    return pd.DataFrame(rows)


def fold_view(table: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """The labelled rows with the probability columns of one fold (``fold{k}_``) or of the
    ensemble (``""``) under training's names, as hmil.evaluate reads them."""
    labelled = table[table["fine_label"].notna()]
    ids = labelled[list(REQUIRED_COLUMNS)].reset_index(drop=True)
    columns = [c for c in table.columns if c.startswith(f"{prefix}p_")]
    values = labelled[columns].reset_index(drop=True)
    values.columns = [c.removeprefix(prefix) for c in columns]
    return pd.concat([ids, values], axis=1)


def external_evaluation(
    table: pd.DataFrame,
    models: list[FoldModel],
    unusable: list[UnusableFold],
    identity: tuple[str, str],
    params: dict[str, Any],
) -> Evaluation | None:
    """Metrics of the labelled slides: each fold model alone (mean ± SD over models) and
    the ensemble (the headline, with its patient bootstrap CI); None without labels."""
    if table.empty or table["fine_label"].notna().sum() == 0:
        return None
    hierarchy = models[0].hierarchy
    classes = Classes(tuple(hierarchy.fine), tuple(hierarchy.coarse))
    has_coarse = bool(table[[f"p_coarse_{c}" for c in hierarchy.coarse]].notna().all().all())

    def as_fold(number: int, run_dir: Path, prefix: str) -> Fold:
        return Fold(number, run_dir, fold_view(table, prefix), classes, has_coarse)

    folds = [as_fold(m.fold, m.run_dir, f"fold{m.fold}_") for m in models]
    missing = [MissingFold(fold_number_from_path(u.run_dir), u.run_dir, u.reason) for u in unusable]
    ensemble = as_fold(-1, models[0].run_dir.parent, "")
    return evaluate(folds, missing, identity, params, pooled=ensemble)


# ---- outputs ---------------------------------------------------------------------------------


def write_attention(path: Path, cohort: Cohort, results: dict[str, BagEnsemble], models) -> None:
    """attention.h5 of the ensemble, in the layout of a fold's (hmil.heatmaps reads both)."""
    from hmil.training.outputs import write_attention as write_fold_attention

    slide_ids = [s for s in cohort.slides["slide_id"] if s in results]
    paths = dict(zip(cohort.slides["slide_id"], cohort.slides["path"], strict=True))
    ensembles = [results[s] for s in slide_ids]
    has_coarse = all(e.coarse_attention is not None for e in ensembles)
    write_fold_attention(
        path,
        slide_ids,
        [Path(paths[s]) for s in slide_ids],
        [e.fine_attention for e in ensembles],
        [e.coarse_attention for e in ensembles] if has_coarse else None,
        models[0].hierarchy,
        models[0].name,
    )
    with h5py.File(path, "a") as file:
        file.attrs["ensemble_folds"] = [m.fold for m in models]
        file.attrs["attention"] = "mean over the fold models, per patch"


def deploy_summary(
    config: DeployConfig,
    models: list[FoldModel],
    unusable: list[UnusableFold],
    cohort: Cohort,
    table: pd.DataFrame,
    evaluation: Evaluation | None,
) -> dict[str, Any]:
    """summary.json: what was deployed, on what, with which folds; and the metrics."""
    identity = run_identity([m.run_dir for m in models], None)
    summary: dict[str, Any] = {}
    if evaluation is not None:
        rows = summary_rows(evaluation)
        summary = summary_json(evaluation, rows, per_class_table(evaluation))
    labelled = int(table["fine_label"].notna().sum()) if not table.empty else 0
    return json_safe(
        {
            **summary,
            "name": f"{config.cohort}: {'/'.join(identity)}",
            "encoder": identity[0],
            "kind": "external",
            "cohort": config.cohort,
            "model": identity[1],
            "folds_used": [m.fold for m in models],
            "missing_folds": [missing_record(u) for u in unusable],
            "n_slides": len(table),
            "n_labelled": labelled,
            "failed_slides": cohort.failed,
            "features": models[0].features,
            "training_code_versions": sorted({m.code_version for m in models if m.code_version}),
            "code_version": code_version(),
            "params": config.params(),
        }
    )


def missing_record(fold: UnusableFold) -> dict[str, Any]:
    number = fold_number_from_path(fold.run_dir)
    return {"fold": number, "run_dir": str(fold.run_dir), "reason": fold.reason}


def write_deployment(
    config: DeployConfig,
    models: list[FoldModel],
    unusable: list[UnusableFold],
    cohort: Cohort,
    results: dict[str, BagEnsemble],
    evaluation: Evaluation | None,
) -> pd.DataFrame:
    """predictions.csv, attention.h5, failed_slides.csv, summary.json/.md, renamed into
    ``out`` together; with labels, hmil.evaluate's tables and plots beside them."""
    table = prediction_rows(cohort, results, models)
    summary = deploy_summary(config, models, unusable, cohort, table, evaluation)
    failed = pd.DataFrame(
        {"slide_id": list(cohort.failed), "reason": list(cohort.failed.values())},
        columns=["slide_id", "reason"],
    )
    out = config.out
    if evaluation is not None:
        # the metric tables and plots first: summary.json (the rule's output) lands last
        write_outputs(evaluation, out)
    names = ("predictions.csv", "attention.h5", "failed_slides.csv", "summary.md", "summary.json")
    with atomic_outputs(*(out / n for n in names)) as temps:
        predictions_tmp, attention_tmp, failed_tmp, markdown_tmp, summary_tmp = temps
        table.to_csv(predictions_tmp, index=False)
        write_attention(attention_tmp, cohort, results, models)
        failed.to_csv(failed_tmp, index=False)
        markdown_tmp.write_text(deploy_markdown(summary, evaluation))
        summary_tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return table


def deploy_markdown(summary: dict[str, Any], evaluation: Evaluation | None) -> str:
    """summary.md: the cross-validation summary's tables for the ensemble, or, without
    labels, what was predicted."""
    if evaluation is not None:
        text = summary_markdown(evaluation, summary_rows(evaluation))
    else:
        text = (
            f"# Deployment: {summary['name']}\n\n"
            f"{summary['n_slides']} slides predicted by the ensemble of folds "
            f"{', '.join(map(str, summary['folds_used']))}; the sheet has no labels, so no "
            "metrics (predictions.csv holds the probabilities).\n"
        )
    if summary["failed_slides"]:
        listed = "; ".join(f"{s}: {r}" for s, r in list(summary["failed_slides"].items())[:10])
        text += f"\n**Slides not predicted ({len(summary['failed_slides'])}):** {listed}\n"
    return text


# ---- the whole deployment --------------------------------------------------------------------


def deploy(config: DeployConfig) -> tuple[pd.DataFrame, dict[str, str], Evaluation | None]:
    """Run a deployment; returns the predictions table, the failed slides and the metrics."""
    device = torch.device(config.device)
    models, unusable = load_fold_models(list(config.run_dirs), device, config.strict)
    slides = read_cohort(config, models[0].hierarchy)
    cohort = locate_features(config, slides, models)
    results = predict_cohort(cohort, models, device, config.strict)
    table = prediction_rows(cohort, results, models)
    identity = run_identity([m.run_dir for m in models], None)
    params = {"bootstrap": config.bootstrap, "seed": config.seed, "strict": config.strict}
    evaluation = external_evaluation(table, models, unusable, identity, params)
    table = write_deployment(config, models, unusable, cohort, results, evaluation)
    return table, cohort.failed, evaluation
