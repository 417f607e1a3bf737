import os
import re
import shlex
import sys

import yaml

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# This file reads the sheets, and the rules run `python -m preprocessing.<module>` and
# `python -m hmil.<module>`, with the installed package: the environment that runs
# Snakemake has it (pyproject.toml lists Snakemake among its dependencies).
try:
    from hmil.data.published_splits import PublishedSplitError, published_split_files
    from hmil.data.split_settings import SplitSettings
    from hmil.evaluation.settings import (
        BootstrapSettings,
        DeploySettings,
        HeatmapSettings,
    )
    from hmil.training.settings import setting_flags
    from plumbing.errors import SheetError
    from plumbing.gpu_claim import detected_gpu_count
    from plumbing.settings import option_words
    from preprocessing.features.settings import ExtractSettings
    from preprocessing.features.import_sources import FeatureImportError, locate_cohort
    from preprocessing.slides.params import PatchParams, TissueParams
    from preprocessing.slides.sheet import read_slide_sheet
except ImportError as err:
    raise WorkflowError(
        f"the pipeline is not installed in this environment ({err}); install it where "
        "Snakemake runs: pip install -c constraints.txt -e . (in the checkout)"
    ) from None


def check_model_names(models, schema_path):
    """One line for an unknown model name, before the schema's many-line enum error."""
    with open(schema_path) as handle:
        known = yaml.safe_load(handle)["properties"]["models"]["items"]["enum"]
    for name in models if isinstance(models, list) else []:
        if name not in known:
            raise WorkflowError(
                f"config models: unknown model {name!r} (available: {', '.join(known)})"
            )


check_model_names(
    config.get("models"), workflow.source_path("../schemas/config.schema.yaml")
)
validate(config, workflow.source_path("../schemas/config.schema.yaml"))


def sheet_hint(path):
    """What to do about a missing sheet of the shipped demo config, or nothing."""
    if not str(path).startswith("demo/") or os.path.exists(path):
        return ""
    return (
        "; the demo cohort is made by `python -m preprocessing.synthetic cohort demo` (or"
        " give your own config with --configfile; `--configfile .test/config/config.yaml`"
        " lints and dry-runs without slides)"
    )


try:
    SLIDES = read_slide_sheet(config["slides"])
except SheetError as err:
    raise WorkflowError(f"slide sheet: {err}{sheet_hint(config['slides'])}") from None
validate(SLIDES, workflow.source_path("../schemas/slides.schema.yaml"))

OUTDIR = config["outdir"].rstrip("/")
SLIDE_IDS = list(SLIDES.index)


def missing_slide_files(sheet):
    """Slide ids whose file is not there, said in one line before planning: patching
    records each as a failed slide (the others go on)."""
    missing = [
        s for s, path in zip(sheet.index, sheet["path"]) if not os.path.exists(path)
    ]
    if missing:
        print(
            f"note: {len(missing)} of {len(sheet)} slide files of {config['slides']} not"
            f" found ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}):"
            " each is recorded as a failed slide",
            file=sys.stderr,
        )
    return set(missing)


MISSING_SLIDES = missing_slide_files(SLIDES)
# Cohorts the trained models are deployed to: name -> sheet file, and name -> sheet.
DEPLOY_SHEETS = {cohort["name"]: cohort["slides"] for cohort in config["deploy"]}
DEPLOY = {}
for _cohort, _sheet in DEPLOY_SHEETS.items():
    try:
        DEPLOY[_cohort] = read_slide_sheet(_sheet, require_labels=False)
    except SheetError as err:
        raise WorkflowError(
            f"deploy cohort {_cohort!r}: slide sheet: {err}{sheet_hint(_sheet)}"
        ) from None
DEPLOY_SLIDE_IDS = sorted({s for sheet in DEPLOY.values() for s in sheet.index})
PREPROCESS = config["preprocessing"]
FEATURES = config["features"]
SPLITS = config["splits"]
TRAINING = config["training"]
EVALUATION = config["evaluation"]
ENCODERS = config["encoders"]
CLUSTER = config["cluster"]
# Encoders whose features were made elsewhere (features.dirs) are imported, not extracted.
IMPORTED = FEATURES["dirs"]
IMPORTED_ENCODERS = [e for e in ENCODERS if e in IMPORTED]
EXTRACTED_ENCODERS = [e for e in ENCODERS if e not in IMPORTED]
# The folds: splits.folds new ones, or the published splits of splits.from_hmil_pkls (their
# pickles are inputs of the splits rule, so a changed pickle writes the folds again).
PUBLISHED_SPLITS = SPLITS["from_hmil_pkls"]
try:
    PUBLISHED_SPLIT_FILES = (
        [str(p) for k in published_split_files(PUBLISHED_SPLITS) for p in k.values()]
        if PUBLISHED_SPLITS
        else []
    )
except PublishedSplitError as err:
    raise WorkflowError(f"splits.from_hmil_pkls: {err}") from None
FOLDS = list(
    range(len(PUBLISHED_SPLIT_FILES) // 3 if PUBLISHED_SPLITS else SPLITS["folds"])
)
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


def check_gpu_resources():
    """`--resources gpu=G` above the GPUs that local jobs can claim: one line. The run goes
    on; a GPU job that finds every GPU claimed waits for one (plumbing/gpu_claim.py)."""
    asked = workflow.global_resources.get("gpu")
    # SLURM places GPUs: a cluster run (`_nodes` is set for non-local executors only) and
    # the Snakemake that runs a job inside its allocation say nothing
    cluster = (
        workflow.global_resources["_nodes"].value is not None or workflow.remote_exec
    )
    wanted = FEATURES["gpus"] or TRAINING["gpus"]
    if cluster or not wanted or asked is None or not isinstance(asked.value, int):
        return
    found = detected_gpu_count()
    where = "(HMIL_GPU_DEVICES, CUDA_VISIBLE_DEVICES or the NVIDIA driver)"
    if found == 0 and asked.value > 0:
        print(
            f"note: --resources gpu={asked.value} but no GPU found here {where}: GPU jobs run"
            " on the CPU with device: auto, and stop saying so with device: cuda",
            file=sys.stderr,
        )
    elif asked.value > found:
        print(
            f"note: --resources gpu={asked.value} but {found} GPU(s) here {where}: {found}"
            f" GPU job(s) run at once, one per GPU, the others wait for a free one"
            f" (use --resources gpu={found})",
            file=sys.stderr,
        )


check_gpu_resources()


def scaled(value):
    """A resource that doubles on each retry, so a job killed for memory or time gets more."""
    return lambda wildcards, attempt: value * 2 ** (attempt - 1)


def alternatives(values):
    """A wildcard regex matching exactly `values`; none matches nothing (not the empty name)."""
    return "|".join(map(re.escape, map(str, values))) or "(?!)"


# An extracted encoder's name is checked by its extraction job against the registry
# (importing the registry here would cost every DAG build seconds of torch import).
for _encoder in IMPORTED:
    if _encoder not in ENCODERS:
        raise WorkflowError(
            f"features.dirs names {_encoder!r}, which is not in encoders"
        )


def imported_sources(encoder):
    """{slide: its features file made elsewhere, or None}; one error line for a wrong folder."""
    try:
        return locate_cohort(IMPORTED[encoder], encoder, SLIDE_IDS)
    except FeatureImportError as err:
        raise WorkflowError(f"features.dirs.{encoder}: {err}") from None


IMPORTED_SOURCES = {encoder: imported_sources(encoder) for encoder in IMPORTED_ENCODERS}
# Heatmaps need patch coordinates: a source of bare tensors has none.
HEATMAP_ENCODERS = [
    e
    for e in ENCODERS
    if e not in IMPORTED_SOURCES
    or any(s is not None and s.is_h5 for s in IMPORTED_SOURCES[e].values())
]
for _encoder in sorted(set(ENCODERS) - set(HEATMAP_ENCODERS)):
    print(
        f"note: the {_encoder} features in {IMPORTED[_encoder]} have no patch coordinates "
        "(.pt tensors): no attention heatmaps for them",
        file=sys.stderr,
    )


# Slide ids are file-name safe (the sheet is checked): one path component. Not an
# alternation of every id, a regex as long as the cohort tried on every file.
wildcard_constraints:
    slide=r"[^/]+",
    cohort=alternatives(DEPLOY),
    encoder=alternatives(ENCODERS),
    model=alternatives(MODELS),
    fold=alternatives(FOLDS),


def slide_file(wildcards):
    """The slide as a Snakemake input, or nothing if it is missing.

    A missing file then reaches the patching step, which records it as a failed slide,
    instead of stopping the whole cohort at DAG construction.
    """
    if "cohort" not in wildcards.keys():
        return [] if wildcards.slide in MISSING_SLIDES else slide_path(wildcards)
    path = slide_path(wildcards)
    return path if os.path.exists(path) else []


def sheet_of(wildcards):
    """The sheet a job's slide comes from: a deployed cohort's, or the training cohort's."""
    return DEPLOY[wildcards.cohort] if "cohort" in wildcards.keys() else SLIDES


def slide_path(wildcards):
    return sheet_of(wildcards).loc[wildcards.slide, "path"]


def patch_arguments(wildcards):
    # each grid and tissue setting of the config (preprocessing/slides/params.py)
    row = sheet_of(wildcards).loc[wildcards.slide]
    args = [
        *option_words(PREPROCESS, PatchParams),
        *option_words(PREPROCESS, TissueParams),
        "--on-error " + ("fail" if config["strict"] else "record"),
    ]
    if "mpp" in row and row["mpp"] == row["mpp"]:  # not NaN
        args.append(f"--mpp {row['mpp']}")
    return " ".join(args)


# ---- feature shards (rules/features.smk) ----
# Shards of features.slides_per_job slides in the sheet's order: slides added at the end
# of the sheet change the last shard only.
SLIDES_PER_JOB = FEATURES["slides_per_job"]
FEATURE_SHARDS = [
    SLIDE_IDS[start : start + SLIDES_PER_JOB]
    for start in range(0, len(SLIDE_IDS), SLIDES_PER_JOB)
]


def shard_slides(wildcards):
    """The slide ids of a shard (an unknown shard number: one line)."""
    shard = int(wildcards.shard)
    if shard >= len(FEATURE_SHARDS):
        raise WorkflowError(
            f"feature shard {shard}: the cohort has shards 0 to {len(FEATURE_SHARDS) - 1}"
        )
    return FEATURE_SHARDS[shard]


def shard_patches(wildcards):
    return [f"{OUTDIR}/patches/{slide}.h5" for slide in shard_slides(wildcards)]


def shard_slide_files(wildcards):
    """The shard's slide files that exist (a missing one is a failed slide of patching)."""
    return [
        SLIDES.at[slide, "path"]
        for slide in shard_slides(wildcards)
        if slide not in MISSING_SLIDES
    ]


def shard_feature_files(wildcards):
    return [
        f"{OUTDIR}/features/{wildcards.encoder}/{slide}.{ext}"
        for slide in shard_slides(wildcards)
        for ext in ("h5", "pt")
    ]


def shard_records(encoder):
    return [
        f"{OUTDIR}/features/{encoder}/shards/shard{k}.csv"
        for k in range(len(FEATURE_SHARDS))
    ]


def encoder_features(encoder):
    """What says an encoder's features are complete: its shard records, or the summary of
    an import. One file per shard, not per slide, keeps planning linear: each training job
    would otherwise depend on every slide's file."""
    if encoder in IMPORTED:
        return [f"{OUTDIR}/features/{encoder}/imported.csv"]
    return shard_records(encoder)


def encoder_weights(wildcards):
    """--weights value of an encoder: a checkpoint path, `random`, or nothing for the hub."""
    weights = FEATURES["weights"].get(wildcards.encoder, "hub")
    return "" if weights == "hub" else f"--weights {weights}"


def weights_file(wildcards):
    """A checkpoint file as a Snakemake input, so that a new checkpoint re-extracts."""
    weights = FEATURES["weights"].get(wildcards.encoder, "hub")
    return [] if weights in ("hub", "random") else [weights]


def extract_arguments(wildcards):
    # the encoder's weights, and each setting of the config (preprocessing/features/settings.py)
    return " ".join(
        [
            encoder_weights(wildcards),
            *option_words(FEATURES, ExtractSettings),
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


def split_arguments(wildcards):
    """hmil.splits options: the published splits, or how to make new ones."""
    if PUBLISHED_SPLITS:
        return f"--from-hmil-pkls {shlex.quote(PUBLISHED_SPLITS)} --folds {len(FOLDS)}"
    # each split setting of the config (hmil/data/split_settings.py)
    return " ".join(option_words(SPLITS, SplitSettings))


def training_arguments(wildcards, input):
    # --protocol, and each training setting the config gives (hmil/training/settings.py);
    # one left out takes the protocol's value. benchmarks/learning_check.py does the same.
    args = [" ".join(setting_flags(TRAINING))]
    args += [
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


def import_inputs(wildcards):
    """The source files of an imported encoder, so that a changed source is imported again."""
    sources = IMPORTED_SOURCES[wildcards.encoder].values()
    return [str(source.path) for source in sources if source is not None]


def heatmap_geometry(wildcards):
    """Where the heatmaps find each slide's patch squares: the patches files, or for imported
    features the thin features files, which carry the coordinates and geometry recorded
    by the tool that made them."""
    if wildcards.encoder in IMPORTED:
        return f"{OUTDIR}/features/{wildcards.encoder}"
    return f"{OUTDIR}/patches"


def run_dirs(encoder, model):
    return [f"{OUTDIR}/models/{encoder}/{model}/fold{fold}" for fold in FOLDS]


# ---- deployment (rules/deploy.smk) ----


def deploy_dir(wildcards):
    return f"{OUTDIR}/deploy/{wildcards.cohort}"


def deploy_slides(folder):
    """A function of the wildcards: one path per slide of the cohort, under `folder`."""
    return lambda wildcards: expand(
        f"{deploy_dir(wildcards)}/{folder.format(**wildcards)}/{{slide}}.h5",
        slide=DEPLOY[wildcards.cohort].index,
    )


def labelled(cohort):
    sheet = DEPLOY[cohort]
    return "label" in sheet.columns and bool(sheet["label"].notna().any())


# Deployment runs for the encoders this workflow extracts (features made elsewhere for
# an external cohort would need their own import).
DEPLOY_TARGETS = [
    (cohort, encoder, model)
    for cohort in DEPLOY
    for encoder in EXTRACTED_ENCODERS
    for model in MODELS
]


def deploy_outputs(name, only_labelled=False):
    return [
        f"{OUTDIR}/deploy/{cohort}/{encoder}/{model}/{name}"
        for cohort, encoder, model in DEPLOY_TARGETS
        if labelled(cohort) or not only_labelled
    ]


def all_outputs():
    # A cohort whose every encoder is imported is never patched.
    patched = [
        f"{OUTDIR}/preprocessing/slides.csv",
        f"{OUTDIR}/preprocessing/degraded_slides.csv",
        expand(f"{OUTDIR}/qc/{{slide}}.png", slide=SLIDE_IDS),
    ]
    return [
        *(patched if EXTRACTED_ENCODERS else []),
        f"{OUTDIR}/eval/comparison.csv",
        expand(
            f"{OUTDIR}/eval/{{encoder}}/{{model}}/heatmaps/fold{{fold}}",
            encoder=HEATMAP_ENCODERS,
            model=MODELS,
            fold=FOLDS,
        ),
        deploy_outputs("predictions.csv"),
        deploy_outputs("heatmaps"),
    ]


def eval_report(name, caption):
    return report(
        f"{OUTDIR}/eval/{{encoder}}/{{model}}/{name}",
        caption=f"../report/{caption}.rst",
        category="3. Evaluation",
        subcategory="{encoder} / {model}",
        labels={"encoder": "{encoder}", "model": "{model}", "figure": name},
    )
