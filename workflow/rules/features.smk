# features.slides_per_job: 1 runs one job per slide (rule extract_features); more runs
# shards of that many slides per job (rules extract_features_shard<k>), each loading the
# model once and writing every slide's own files. Shards follow the sheet's order, so
# slides added at its end leave the earlier shards as they are.
SLIDES_PER_JOB = FEATURES["slides_per_job"]
FEATURE_SHARDS = (
    []
    if SLIDES_PER_JOB == 1
    else [
        SLIDE_IDS[start : start + SLIDES_PER_JOB]
        for start in range(0, len(SLIDE_IDS), SLIDES_PER_JOB)
    ]
)
# The training slides this rule encodes one job each (deploy_extract_features, in
# deploy.smk, sets its own constraints: deployed slides are never sharded).
UNSHARDED_SLIDES = SLIDE_IDS if SLIDES_PER_JOB == 1 else []


rule extract_features:
    input:
        patches=f"{OUTDIR}/patches/{{slide}}.h5",
        slide=slide_file,
        weights=weights_file,
    output:
        features=f"{OUTDIR}/features/{{encoder}}/{{slide}}.h5",
        pt=f"{OUTDIR}/features/{{encoder}}/{{slide}}.pt",
    log:
        f"{OUTDIR}/logs/features/{{encoder}}/{{slide}}.log",
    # Imported encoders' features come from rule import_features, never from here.
    wildcard_constraints:
        encoder=alternatives(EXTRACTED_ENCODERS),
        slide=alternatives(UNSHARDED_SLIDES),
    conda:
        "../../envs/features.yaml"
    threads: FEATURES["threads"]
    resources:
        mem_mb=scaled(FEATURES["mem_mb"]),
        runtime=scaled(120),
        gpu=FEATURES["gpus"],
        slurm_partition=slurm_partition(FEATURES["gpus"]),
    params:
        slide=slide_path,
        args=extract_arguments,
    shell:
        "python -m preprocessing.extract {params.slide:q} {input.patches:q}"
        " --encoder {wildcards.encoder:q} --out {output.features:q} --out-pt {output.pt:q}"
        " {params.args} > {log:q} 2>&1"


for _shard, _slides in enumerate(FEATURE_SHARDS):

    rule:
        name:
            f"extract_features_shard{_shard}"
        input:
            patches=[f"{OUTDIR}/patches/{slide}.h5" for slide in _slides],
            slides=[p for p in SLIDES.loc[_slides, "path"] if os.path.exists(p)],
            weights=weights_file,
        output:
            features=[f"{OUTDIR}/features/{{encoder}}/{slide}.h5" for slide in _slides],
            pt=[f"{OUTDIR}/features/{{encoder}}/{slide}.pt" for slide in _slides],
        log:
            log=f"{OUTDIR}/logs/features/{{encoder}}/shard{_shard}.log",
            failed=f"{OUTDIR}/logs/features/{{encoder}}/shard{_shard}_failed.csv",
        wildcard_constraints:
            encoder=alternatives(EXTRACTED_ENCODERS),
        conda:
            "../../envs/features.yaml"
        threads: FEATURES["threads"]
        resources:
            mem_mb=scaled(FEATURES["mem_mb"]),
            runtime=scaled(120),
            gpu=FEATURES["gpus"],
            slurm_partition=slurm_partition(FEATURES["gpus"]),
        params:
            sheet=config["slides"],
            slide_ids=" ".join(_slides),
            patches=lambda wildcards, input: os.path.dirname(input.patches[0]),
            out=lambda wildcards, output: os.path.dirname(output.features[0]),
            # A failing slide gets a flagged file and the shard goes on, unless strict.
            mode="--strict" if config["strict"] else "--record-failed",
            args=extract_arguments,
        shell:
            "python -m preprocessing.extract --sheet {params.sheet:q}"
            " --slide-ids {params.slide_ids} --patches-dir {params.patches:q}"
            " --out-dir {params.out:q} --failed-list {log.failed:q}"
            " --encoder {wildcards.encoder:q} {params.mode} {params.args} > {log.log:q} 2>&1"


rule feature_summary:
    input:
        expand(
            f"{OUTDIR}/features/{{encoder}}/{{slide}}.h5",
            encoder=EXTRACTED_ENCODERS,
            slide=SLIDE_IDS,
        ),
    output:
        report(
            f"{OUTDIR}/preprocessing/degraded_slides.csv",
            caption="../report/degraded_slides.rst",
            category="1. Preprocessing",
            subcategory="Cohort",
        ),
    log:
        f"{OUTDIR}/logs/feature_summary.log",
    localrule: True
    conda:
        "../../envs/features.yaml"
    shell:
        "python -m preprocessing.feature_summary {input:q} --out {output:q} 2>&1 | tee {log:q}"
