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


wildcard_constraints:
    slide="|".join(map(re.escape, SLIDE_IDS)),


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


def all_outputs():
    return [
        f"{OUTDIR}/preprocessing/slides.csv",
        expand(f"{OUTDIR}/qc/{{slide}}.png", slide=SLIDE_IDS),
    ]
