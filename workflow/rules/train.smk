rule train:
    input:
        features=lambda wildcards: encoder_features(wildcards.encoder),
        splits=f"{OUTDIR}/splits/DATA_SPLIT.csv",
        hierarchy=HIERARCHY_FILE,
        teacher=teacher_checkpoint,
    output:
        model=f"{OUTDIR}/models/{{encoder}}/{{model}}/fold{{fold}}/model.pt",
        predictions=f"{OUTDIR}/models/{{encoder}}/{{model}}/fold{{fold}}/predictions.csv",
        metrics=f"{OUTDIR}/models/{{encoder}}/{{model}}/fold{{fold}}/metrics.json",
        attention=f"{OUTDIR}/models/{{encoder}}/{{model}}/fold{{fold}}/attention.h5",
        log=f"{OUTDIR}/models/{{encoder}}/{{model}}/fold{{fold}}/log.csv",
    log:
        f"{OUTDIR}/logs/train/{{encoder}}/{{model}}/fold{{fold}}.log",
    conda:
        "../../envs/train.yaml"
    threads: TRAINING["threads"]
    resources:
        mem_mb=scaled(TRAINING["mem_mb"]),
        runtime=scaled(240),
        gpu=TRAINING["gpus"],
        slurm_partition=slurm_partition(TRAINING["gpus"]),
    params:
        features=lambda wildcards: f"{OUTDIR}/features/{wildcards.encoder}",
        out=subpath(output.model, parent=True),
        hierarchy=HIERARCHY,
        args=training_arguments,
    # The feature cache takes half the job's memory (whole GiB), so jobs run side by side
    # within --resources mem_mb fit; bags beyond it are read every epoch. From resources,
    # not params: a new memory figure must not mark the models for training again.
    shell:
        "python -m hmil.train --features {params.features:q} --splits {input.splits:q}"
        " --fold {wildcards.fold} --model {wildcards.model} --hierarchy {params.hierarchy:q}"
        " --out {params.out:q} {params.args} --cache-gib $(({resources.mem_mb} / 2048))"
        " > {log:q} 2>&1"
