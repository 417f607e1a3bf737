rule patch:
    input:
        slide=slide_file,
    output:
        patches=f"{OUTDIR}/patches/{{slide}}.h5",
        qc=report(
            f"{OUTDIR}/qc/{{slide}}.png",
            caption="../report/qc.rst",
            category="1. Preprocessing",
            subcategory="Tissue and patch grid",
            labels={"slide": "{slide}"},
        ),
        geojson=f"{OUTDIR}/tissue/{{slide}}.geojson",
    log:
        f"{OUTDIR}/logs/patch/{{slide}}.log",
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(30),
        slurm_partition=slurm_partition(),
    params:
        slide=slide_path,
        args=patch_arguments,
    shell:
        "python -m preprocessing.patch {params.slide:q} --slide-id {wildcards.slide}"
        " --out {output.patches:q} --qc {output.qc:q} --geojson {output.geojson:q}"
        " {params.args} > {log:q} 2>&1"


rule preprocess_summary:
    input:
        expand(f"{OUTDIR}/patches/{{slide}}.h5", slide=SLIDE_IDS),
    output:
        stats=report(
            f"{OUTDIR}/preprocessing/slides.csv",
            caption="../report/preprocess_summary.rst",
            category="1. Preprocessing",
            subcategory="Cohort",
        ),
        failed=report(
            f"{OUTDIR}/preprocessing/failed_slides.csv",
            caption="../report/failed_slides.rst",
            category="1. Preprocessing",
            subcategory="Cohort",
        ),
    log:
        f"{OUTDIR}/logs/preprocess_summary.log",
    conda:
        "../../envs/preprocess.yaml"
    params:
        module="preprocessing.summary",
        files=lambda wildcards, input: input,
        options=lambda wildcards, output: [
            "--out",
            output.stats,
            "--failed",
            output.failed,
        ],
    script:
        # not `shell:`: the list of every slide's file outgrows exec's ARG_MAX
        "../scripts/run_with_file_list.py"
