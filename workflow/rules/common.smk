import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

PROJECT_ROOT = Path(workflow.basedir).parent
# Rules call `python -m preprocessing.<module>`; make the project importable in every
# job, including per-rule conda envs where it is not pip-installed.
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        p for p in (str(PROJECT_ROOT), os.getenv("PYTHONPATH")) if p
    )
)
sys.path.insert(0, str(PROJECT_ROOT))

from preprocessing.errors import SheetError  # noqa: E402
from preprocessing.sheet import read_slide_sheet  # noqa: E402

validate(config, workflow.source_path("../schemas/config.schema.yaml"))

try:
    SLIDES = read_slide_sheet(config["slides"])
except SheetError as err:
    raise WorkflowError(f"slide sheet: {err}") from None
validate(SLIDES, workflow.source_path("../schemas/slides.schema.yaml"))

OUTDIR = config["outdir"].rstrip("/")
SLIDE_IDS = list(SLIDES.index)
PREPROCESS = config["preprocessing"]
FEATURES = config["features"]
SPLITS = config["splits"]
TRAINING = config["training"]
EVALUATION = config["evaluation"]
ENCODERS = config["encoders"]
CLUSTER = config["cluster"]
FOLDS = list(range(SPLITS["folds"]))
# The hierarchy is a YAML file (then a Snakemake input) or a preset name.
HIERARCHY = config["hierarchy"]
HIERARCHY_FILE = [HIERARCHY] if HIERARCHY.endswith((".yaml", ".yml")) else []
# An MHIM model is taught by the same fold's trained baseline: train that one too.
MHIM_PREFIX = "mhim_"
MODELS = list(
    dict.fromkeys(
        m
        for model in config["models"]
        for m in (
            [model.removeprefix(MHIM_PREFIX), model]
            if model.startswith(MHIM_PREFIX)
            else [model]
        )
    )
)


def slurm_partition(gpus=0):
    """SLURM partition of a job; empty leaves the choice to the cluster's default."""
    return (gpus and CLUSTER["gpu_partition"]) or CLUSTER["partition"]


def scaled(value):
    """A resource that doubles on each retry, so a job killed for memory or time gets more."""
    return lambda wildcards, attempt: value * 2 ** (attempt - 1)


def alternatives(values):
    return "|".join(map(re.escape, map(str, values)))


wildcard_constraints:
    slide=alternatives(SLIDE_IDS),
    encoder=alternatives(ENCODERS),
    model=alternatives(MODELS),
    fold=alternatives(FOLDS),


def slide_file(wildcards):
    """The slide as a Snakemake input, or nothing if it is missing.

    A missing file then reaches the patching step, which records it as a failed slide,
    instead of stopping the whole cohort at DAG construction.
    """
    path = SLIDES.loc[wildcards.slide, "path"]
    return path if os.path.exists(path) else []


def patch_arguments(wildcards):
    row = SLIDES.loc[wildcards.slide]
    args = [
        f"--target-mpp {PREPROCESS['target_mpp']}",
        f"--patch-size {PREPROCESS['patch_size']}",
        f"--min-tissue {PREPROCESS['min_tissue']}",
        f"--overlap {PREPROCESS['overlap']}",
        f"--seg-mpp {PREPROCESS['seg_mpp']}",
        f"--threshold {PREPROCESS['threshold']}",
        f"--min-tissue-area {PREPROCESS['min_tissue_area_um2']}",
        f"--min-hole-area {PREPROCESS['min_hole_area_um2']}",
        "--on-error " + ("fail" if config["strict"] else "record"),
    ]
    if "mpp" in row and row["mpp"] == row["mpp"]:  # not NaN
        args.append(f"--mpp {row['mpp']}")
    return " ".join(args)


def encoder_weights(wildcards):
    """--weights value of an encoder: a checkpoint path, `random`, or nothing for the hub."""
    weights = FEATURES["weights"].get(wildcards.encoder, "hub")
    return "" if weights == "hub" else f"--weights {weights}"


def weights_file(wildcards):
    """A checkpoint file as a Snakemake input, so that a new checkpoint re-extracts."""
    weights = FEATURES["weights"].get(wildcards.encoder, "hub")
    return [] if weights in ("hub", "random") else [weights]


def extract_arguments(wildcards):
    return " ".join(
        [
            encoder_weights(wildcards),
            f"--batch-size {FEATURES['batch_size']}",
            f"--workers {FEATURES['workers']}",
            f"--device {FEATURES['device']}",
            f"--precision {FEATURES['precision']}",
            f"--dtype {FEATURES['dtype']}",
            "--on-bad-patch " + ("fail" if config["strict"] else "skip"),
        ]
    )


def teacher_checkpoint(wildcards):
    """The baseline model.pt an MHIM model starts its teacher from (nothing otherwise)."""
    if not wildcards.model.startswith(MHIM_PREFIX):
        return []
    baseline = wildcards.model.removeprefix(MHIM_PREFIX)
    return (
        f"{OUTDIR}/models/{wildcards.encoder}/{baseline}/fold{wildcards.fold}/model.pt"
    )


def training_arguments(wildcards, input):
    args = [
        f"--epochs {TRAINING['epochs']}",
        f"--batch-bags {TRAINING['batch_bags']}",
        f"--lr {TRAINING['lr']}",
        f"--optimizer {TRAINING['optimizer']}",
        f"--scheduler {TRAINING['scheduler']}",
        f"--patience {TRAINING['patience']}",
        f"--seed {TRAINING['seed']}",
        f"--device {TRAINING['device']}",
        "--restart-if-changed",
        # A failed fold is recorded (and named by evaluation and comparison) unless strict.
        "--on-error " + ("fail" if config["strict"] else "record"),
    ]
    if config["strict"]:
        args.append("--strict")
    if input.teacher:
        args.append(f"--teacher {input.teacher}")
    return " ".join(args)


def run_dirs(encoder, model):
    return [f"{OUTDIR}/models/{encoder}/{model}/fold{fold}" for fold in FOLDS]


def all_outputs():
    return [
        f"{OUTDIR}/preprocessing/slides.csv",
        expand(f"{OUTDIR}/qc/{{slide}}.png", slide=SLIDE_IDS),
        f"{OUTDIR}/eval/comparison.csv",
        expand(
            f"{OUTDIR}/eval/{{encoder}}/{{model}}/heatmaps/fold{{fold}}",
            encoder=ENCODERS,
            model=MODELS,
            fold=FOLDS,
        ),
    ]


def eval_report(name, caption):
    return report(
        f"{OUTDIR}/eval/{{encoder}}/{{model}}/{name}",
        caption=f"../report/{caption}.rst",
        category="3. Evaluation",
        subcategory="{encoder} / {model}",
        labels={"encoder": "{encoder}", "model": "{model}", "figure": name},
    )
