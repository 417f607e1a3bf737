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
