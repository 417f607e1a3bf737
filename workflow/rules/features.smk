# One rule, extract_features, encodes shards of features.slides_per_job slides (1: one
# slide per job): a job loads the model once, writes every slide's own files
# (features/{encoder}/{slide}.h5/.pt, kept when already valid for the same weights) and
# its shard record, features/{encoder}/shards/shard{shard}.csv: one row per slide with its
# status; a failing slide gets a flagged file and the shard goes on, unless strict. The
# record is what Snakemake tracks (the per-slide files are the job's, not declared: one
# rule with a {shard} wildcard plans in linear time, where a generated rule per shard made
# planning quadratic). Shards follow the sheet's order, so slides added at its end leave
# the earlier shards alone; `--forcerun` of a shard record re-runs that shard only.


rule extract_features:
    input:
        patches=shard_patches,
        slides=shard_slide_files,
        weights=weights_file,
    output:
        record=f"{OUTDIR}/features/{{encoder}}/shards/shard{{shard}}.csv",
    log:
        log=f"{OUTDIR}/logs/features/{{encoder}}/shard{{shard}}.log",
        failed=f"{OUTDIR}/logs/features/{{encoder}}/shard{{shard}}_failed.csv",
    # Imported encoders' features come from rule import_features, never from here.
    wildcard_constraints:
        encoder=alternatives(EXTRACTED_ENCODERS),
        shard=r"\d+",
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
        slide_ids=lambda wildcards: " ".join(shard_slides(wildcards)),
        patches=f"{OUTDIR}/patches",
        out=lambda wildcards: f"{OUTDIR}/features/{wildcards.encoder}",
        # a shard that re-runs computes its slides again, as if they were its outputs
        previous=shard_feature_files,
        # A failing slide gets a flagged file and the shard goes on, unless strict.
        mode="--strict" if config["strict"] else "--record-failed",
        args=extract_arguments,
    shell:
        "rm -f {params.previous:q} && python -m preprocessing.extract --sheet {params.sheet:q}"
        " --slide-ids {params.slide_ids} --patches-dir {params.patches:q}"
        " --out-dir {params.out:q} --failed-list {log.failed:q}"
        " --shard-record {output.record:q} --encoder {wildcards.encoder:q} {params.mode}"
        " {params.args} > {log.log:q} 2>&1"


rule feature_summary:
    input:
        [record for encoder in EXTRACTED_ENCODERS for record in shard_records(encoder)],
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
    params:
        module="preprocessing.feature_summary",
        files=[
            f"{OUTDIR}/features/{encoder}/{slide}.h5"
            for encoder in EXTRACTED_ENCODERS
            for slide in SLIDE_IDS
        ],
        options=lambda wildcards, output: ["--out", output[0]],
    script:
        # not `shell:`: the list of every slide's file outgrows exec's ARG_MAX
        "../scripts/run_with_file_list.py"
