"""Deploy a trained encoder × model to another cohort: the ensemble of its fold models.

    python -m hmil.deploy models/uni/hmil/fold0 ... models/uni/hmil/fold4 \
        --slides external.csv --features deploy/external/features/uni \
        --out deploy/external/uni/hmil [--cohort external] [--bootstrap 1000] [--strict]

Writes into --out: predictions.csv (per slide: the ensemble's fine, coarse-head and
coarse-from-fine probabilities ``p_*`` and classes ``pred_*``, then every fold's
``fold{k}_p_*``), attention.h5 (the fold models' attention averaged per patch, read by
``python -m hmil.heatmaps``), failed_slides.csv, summary.md/.json; for a sheet with labels
also hmil.evaluate's metric tables, ROC and confusion plots with bootstrap CIs, computed on
the ensemble (summary.md also gives each fold model alone, as mean ± SD).
The features must be made as the training features were (encoder, weights, patch size,
mpp: checked against what training recorded in model.pt); labels, where given, must be
fine classes of the models' hierarchy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hmil.evaluation.deploy import deploy
from hmil.evaluation.deploy_inputs import DeployConfig, DeployError
from hmil.evaluation.settings import DeploySettings
from plumbing.cli import add_options, config_from_args, run_cli, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hmil.deploy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
        help="fold directories of one trained run (models/{encoder}/{model}/fold{k})",
    )  # fmt: skip
    parser.add_argument(
        "--slides", type=Path, required=True,
        help="slide sheet of the cohort (slide_id[, patient_id, label, path]; labels optional)",
    )  # fmt: skip
    parser.add_argument(
        "--features", type=Path, required=True,
        help="folder of the cohort's <slide_id>.h5 (or .pt) features, same encoder as training",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--cohort", default="external", help="cohort name shown in the outputs")
    add_options(parser, DeploySettings)  # the bootstrap, and the device
    parser.add_argument(
        "--strict", action="store_true",
        help="a failed or missing fold, or a slide without usable features, is an error "
        "(default: left out and named in the outputs)",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DeployError("--device cuda: no CUDA device is available")
    config = config_from_args(
        DeployConfig,
        args,
        run_dirs=tuple(args.run_dirs),
        sheet=args.slides,
        features_dir=args.features,
    )
    table, failed, evaluation = deploy(config)
    line = f"{config.cohort}: {len(table)} slides predicted → {config.out}"
    if evaluation is not None:
        fine = evaluation.levels["fine"].pooled.headline["auc"]
        line += f"; ensemble fine AUC {fine:.3f} on {len(evaluation.oof)} labelled slides"
    if failed:
        line += f"; {len(failed)} slide(s) not predicted (failed_slides.csv)"
    print(line)
    return 0


if __name__ == "__main__":
    run_cli(main)
