"""Train one MIL model on one fold of a DATA_SPLIT.csv and write its per-fold outputs.

    python -m hmil.train --features DIR --splits DATA_SPLIT.csv --fold K --model hmil \
        --hierarchy bracs --out models/uni/hmil/fold0 [--epochs 200] [--seed 0]

Outputs in --out, each written atomically: model.pt (best weights by validation fine
macro AUC), predictions.csv (val and test slides), metrics.json, attention.h5 (test
slides), log.csv (one row per epoch), and last.pt (the resume checkpoint, rewritten
every epoch). Rerunning the same command resumes from last.pt; a run whose outputs are
complete and were made with the same settings is not retrained. ``--stop-after N`` ends
this invocation after N epochs, leaving last.pt (for time-limited jobs and tests).

``--protocol`` picks the training settings that a flag does not give
(:class:`~hmil.training.settings.TrainingSettings`): ``default``, chosen on the benchmark grid
(benchmarks/learning_check.py), learns on cohorts of 100–1,000 slides; ``paper`` is the HMIL
paper's code (Adam 1e-4, 64 bags per step, ReduceLROnPlateau without a floor, no
regularisation), whose lr collapses within a few dozen epochs on such cohorts
(config/README.md, "Training protocols").
"""

from __future__ import annotations

import argparse

from hmil.data.bags import BagError
from hmil.data.hierarchy import HierarchyError
from hmil.models import list_models
from hmil.training.config import DEVICES, ON_ERROR, RunOptions, TrainingError, TrainSettings
from hmil.training.failures import record_failure
from hmil.training.fit import fit_fold
from hmil.training.settings import add_setting_options
from plumbing.cli import argparse_type, config_from_args, run_cli, setup_logging
from plumbing.gpu_claim import claim_for_device
from plumbing.settings import Bounded


def main(argv: list[str] | None = None) -> int:
    settings, options, verbose = parse_args(argv)
    setup_logging(verbose)
    # before torch starts CUDA: this job's own GPU on a machine of several
    claim_for_device(options.device)
    try:
        fit_fold(settings, options)
    except Exception as error:
        if isinstance(error, (BagError, HierarchyError)):
            # ValueErrors of hmil (not PipelineErrors): bad input, one line.
            error = TrainingError(str(error))
        if options.on_error != "record":
            raise error  # run_cli prints a TrainingError as one line
        return record_failure(settings, options.out, error)
    return 0


def parse_args(argv: list[str] | None) -> tuple[TrainSettings, RunOptions, bool]:
    """The run's settings and options (bad values: a usage error naming the option), and
    whether to log debug lines."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return (
            config_from_args(TrainSettings, args),
            config_from_args(RunOptions, args),
            (args.verbose),
        )
    except TrainingError as error:
        parser.error(str(error))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hmil.train", description=__doc__.split("\n\n")[0]
    )
    # the order of the options is the order --help lists them in
    add_input_options(parser)
    add_setting_options(parser)  # --protocol and the training settings it gives
    add_model_options(parser)
    add_run_options(parser)
    return parser


def add_input_options(parser: argparse.ArgumentParser) -> None:
    """What the fold trains on and where its outputs go."""
    parser.add_argument("--features", required=True, help="directory of <slide_id>.h5 files")
    parser.add_argument("--splits", required=True, help="DATA_SPLIT.csv")
    parser.add_argument("--fold", type=int, required=True, help="fold index k (column fold<k>)")
    parser.add_argument("--model", required=True, help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--hierarchy", required=True, help="hierarchy YAML or preset name")
    parser.add_argument("--out", required=True, help="output directory of this fold")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds every random generator (recorded)"
    )
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="torch device to train on")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The loss, and the MHIM models' teacher and preset."""
    parser.add_argument(
        "--loss-preset",
        default=None,
        help="preset of hmil/presets/loss_presets.yaml: it changes only the terms it names of "
        "the model's own loss (default: that loss; hmil, hmil_mb, clam, dsmil, or flat for "
        "models without a coarse head)",
    )
    parser.add_argument(
        "--teacher",
        default=None,
        help="mhim_* models: the model.pt of the same fold's baseline run (e.g. "
        "models/<encoder>/abmil/fold<k>/model.pt for mhim_abmil)",
    )
    parser.add_argument(
        "--mhim-preset",
        default=None,
        help="mhim_* models: preset of hmil/presets/mhim_presets.yaml (default: <student>_c16)",
    )


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """How a run treats earlier outputs and failures, reads its bags and logs."""
    parser.add_argument(
        "--restart-if-changed",
        action="store_true",
        help="discard outputs and checkpoint of an earlier run in --out with other settings "
        "(default: refuse to touch them)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="fail on slides whose feature file is flagged empty/failed instead of leaving "
        "them out",
    )
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="fail",
        help="when training fails: exit 1 with one error line, or record the failure in "
        "every output (metrics.json status 'failed') and exit 0, so a cohort run goes on",
    )
    parser.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader processes reading bags"
    )
    parser.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep all train and val features in memory after their first read (--no-cache: "
        "none; default: up to --cache-gib, when --num-workers is 0)",
    )
    parser.add_argument(
        "--cache-gib",
        type=argparse_type(Bounded(float, minimum=0)),
        default=None,
        help="memory the kept features may fill; the rest is read from disk every epoch, "
        "ahead of the model (default: a quarter of the available memory)",
    )
    parser.add_argument(
        "--stop-after", type=int, default=None, help="end this invocation after N epochs"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


if __name__ == "__main__":
    run_cli(main)
