# Deployment: the trained fold models of every encoder x model applied to the cohorts of
# `deploy:`. Their slides are patched and encoded by the training cohort's rules and
# parameters (the same rules, under deploy/{cohort}/); hmil.deploy then checks the
# features against what training recorded in model.pt. Nothing here trains.


use rule patch as deploy_patch with:
    output:
        patches=f"{OUTDIR}/deploy/{{cohort}}/patches/{{slide}}.h5",
        qc=report(
            f"{OUTDIR}/deploy/{{cohort}}/qc/{{slide}}.png",
            caption="../report/qc.rst",
            category="5. Deployment",
            subcategory="{cohort}: tissue and patch grid",
            labels={"cohort": "{cohort}", "slide": "{slide}"},
        ),
        geojson=f"{OUTDIR}/deploy/{{cohort}}/tissue/{{slide}}.geojson",
    log:
        f"{OUTDIR}/logs/deploy/{{cohort}}/patch/{{slide}}.log",


# One job per deployed slide, whatever the training cohort's sharding.
rule deploy_extract_features:
    input:
        patches=f"{OUTDIR}/deploy/{{cohort}}/patches/{{slide}}.h5",
        slide=slide_file,
        weights=weights_file,
    output:
        features=f"{OUTDIR}/deploy/{{cohort}}/features/{{encoder}}/{{slide}}.h5",
        pt=f"{OUTDIR}/deploy/{{cohort}}/features/{{encoder}}/{{slide}}.pt",
    log:
        f"{OUTDIR}/logs/deploy/{{cohort}}/features/{{encoder}}/{{slide}}.log",
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


rule deploy:
    input:
        models=lambda wildcards: [
            f"{run}/model.pt" for run in run_dirs(wildcards.encoder, wildcards.model)
        ],
        features=deploy_slides("features/{encoder}"),
        sheet=lambda wildcards: DEPLOY_SHEETS[wildcards.cohort],
    output:
        predictions=f"{OUTDIR}/deploy/{{cohort}}/{{encoder}}/{{model}}/predictions.csv",
        attention=f"{OUTDIR}/deploy/{{cohort}}/{{encoder}}/{{model}}/attention.h5",
        summary=f"{OUTDIR}/deploy/{{cohort}}/{{encoder}}/{{model}}/summary.json",
        summary_md=report(
            f"{OUTDIR}/deploy/{{cohort}}/{{encoder}}/{{model}}/summary.md",
            caption="../report/deploy.rst",
            category="5. Deployment",
            subcategory="{cohort}: {encoder} / {model}",
            labels={"cohort": "{cohort}", "encoder": "{encoder}", "model": "{model}"},
        ),
    log:
        f"{OUTDIR}/logs/deploy/{{cohort}}/{{encoder}}/{{model}}.log",
    conda:
        "../../envs/train.yaml"
    threads: TRAINING["threads"]
    resources:
        mem_mb=scaled(TRAINING["mem_mb"]),
        runtime=scaled(60),
        slurm_partition=slurm_partition(),
    params:
        runs=lambda wildcards: " ".join(run_dirs(wildcards.encoder, wildcards.model)),
        features=lambda wildcards: f"{deploy_dir(wildcards)}/features/{wildcards.encoder}",
        out=subpath(output.predictions, parent=True),
        # the evaluation's bootstrap settings (hmil/evaluation/settings.py)
        settings=" ".join(option_words(EVALUATION, DeploySettings)),
        strict="--strict" if config["strict"] else "",
    shell:
        "python -m hmil.deploy {params.runs} --slides {input.sheet:q}"
        " --features {params.features:q} --out {params.out:q} --cohort {wildcards.cohort}"
        " {params.settings} {params.strict} > {log:q} 2>&1"


use rule heatmaps as deploy_heatmaps with:
    input:
        attention=f"{OUTDIR}/deploy/{{cohort}}/{{encoder}}/{{model}}/attention.h5",
        predictions=f"{OUTDIR}/deploy/{{cohort}}/{{encoder}}/{{model}}/predictions.csv",
        patches=deploy_slides("patches"),
        sheet=lambda wildcards: DEPLOY_SHEETS[wildcards.cohort],
    output:
        report(
            directory(f"{OUTDIR}/deploy/{{cohort}}/{{encoder}}/{{model}}/heatmaps"),
            patterns=["{name}.png", "{name}.jpg"],
            caption="../report/heatmaps.rst",
            category="5. Deployment",
            subcategory="{cohort}: {encoder} / {model} heatmaps",
            labels={"slide": "{name}"},
        ),
    log:
        f"{OUTDIR}/logs/deploy/{{cohort}}/heatmaps/{{encoder}}/{{model}}.log",
    params:
        patches=lambda wildcards, input: Path(input.patches[0]).parent,
        settings=" ".join(option_words(EVALUATION, HeatmapSettings)),
