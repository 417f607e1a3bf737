rule evaluate:
    input:
        predictions=lambda wildcards: [
            f"{run}/predictions.csv"
            for run in run_dirs(wildcards.encoder, wildcards.model)
        ],
        logs=lambda wildcards: [
            f"{run}/log.csv" for run in run_dirs(wildcards.encoder, wildcards.model)
        ],
    output:
        summary=eval_report("summary.csv", "summary"),
        summary_md=f"{OUTDIR}/eval/{{encoder}}/{{model}}/summary.md",
        summary_json=f"{OUTDIR}/eval/{{encoder}}/{{model}}/summary.json",
        per_class=eval_report("per_class.csv", "per_class"),
        roc=eval_report("roc_fine.png", "roc"),
        roc_coarse=eval_report("roc_coarse_from_fine.png", "roc"),
        confusion=eval_report("confusion_fine.png", "confusion"),
        confusion_coarse=eval_report("confusion_coarse_from_fine.png", "confusion"),
        curves=eval_report("training_curves.png", "training_curves"),
    log:
        f"{OUTDIR}/logs/evaluate/{{encoder}}/{{model}}.log",
    conda:
        "../../envs/train.yaml"
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(30),
        slurm_partition=slurm_partition(),
    params:
        runs=lambda wildcards: " ".join(run_dirs(wildcards.encoder, wildcards.model)),
        out=subpath(output.summary, parent=True),
        on_error="--strict" if config["strict"] else "--on-error record",
        # the bootstrap settings (hmil/evaluation/settings.py)
        settings=" ".join(option_words(EVALUATION, BootstrapSettings)),
    shell:
        "python -m hmil.evaluate {params.runs} --out {params.out:q}"
        " --name {wildcards.encoder}/{wildcards.model} {params.on_error}"
        " {params.settings} > {log:q} 2>&1"


rule heatmaps:
    input:
        attention=f"{OUTDIR}/models/{{encoder}}/{{model}}/fold{{fold}}/attention.h5",
        predictions=f"{OUTDIR}/models/{{encoder}}/{{model}}/fold{{fold}}/predictions.csv",
        sheet=config["slides"],
    output:
        report(
            directory(f"{OUTDIR}/eval/{{encoder}}/{{model}}/heatmaps/fold{{fold}}"),
            patterns=["{name}.png", "{name}.jpg"],
            caption="../report/heatmaps.rst",
            category="4. Attention heatmaps",
            subcategory="{encoder} / {model} / fold {fold}",
            labels={"slide": "{name}", "fold": "{fold}"},
        ),
    log:
        f"{OUTDIR}/logs/heatmaps/{{encoder}}/{{model}}/fold{{fold}}.log",
    conda:
        "../../envs/train.yaml"
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(30),
        slurm_partition=slurm_partition(),
    params:
        # made before attention.h5: the patches files, or an import's features files
        patches=heatmap_geometry,
        # --top-k and --thumbnail-size (hmil/evaluation/settings.py)
        settings=" ".join(option_words(EVALUATION, HeatmapSettings)),
    shell:
        "python -m hmil.heatmaps {input.attention:q} --slides {input.sheet:q}"
        " --patches {params.patches:q} --predictions {input.predictions:q}"
        " {params.settings} --geojson"
        " --out {output:q} > {log:q} 2>&1"


rule compare:
    input:
        expand(
            f"{OUTDIR}/eval/{{encoder}}/{{model}}/summary.json",
            encoder=ENCODERS,
            model=MODELS,
        ),
        # deployments to labelled cohorts: the external validation table
        external=lambda wildcards: deploy_outputs("summary.json", only_labelled=True),
    output:
        table=report(
            f"{OUTDIR}/eval/comparison.csv",
            caption="../report/comparison.rst",
            category="3. Evaluation",
            subcategory="All models",
        ),
        markdown=f"{OUTDIR}/eval/comparison.md",
        plot=report(
            f"{OUTDIR}/eval/class_auc.png",
            caption="../report/class_auc.rst",
            category="3. Evaluation",
            subcategory="All models",
        ),
    log:
        f"{OUTDIR}/logs/compare.log",
    conda:
        "../../envs/train.yaml"
    params:
        runs=lambda wildcards, input: " ".join(
            str(Path(path).parent) for path in input if path not in input.external
        ),
        external=lambda wildcards, input: " ".join(
            ["--external", *(str(Path(path).parent) for path in input.external)]
            if input.external
            else []
        ),
    shell:
        "python -m hmil.compare {params.runs} --out {output.table:q}"
        " --md {output.markdown:q} --plot {output.plot:q} {params.external} > {log:q} 2>&1"
