rule splits:
    input:
        sheet=config["slides"],
        hierarchy=HIERARCHY_FILE,
    output:
        splits=report(
            f"{OUTDIR}/splits/DATA_SPLIT.csv",
            caption="../report/splits.rst",
            category="2. Cross-validation splits",
        ),
        meta=f"{OUTDIR}/splits/DATA_SPLIT.json",
    log:
        f"{OUTDIR}/logs/splits.log",
    conda:
        "../../envs/train.yaml"
    params:
        hierarchy=HIERARCHY,
        folds=SPLITS["folds"],
        seed=SPLITS["seed"],
        val_fraction=SPLITS["val_fraction"],
        protocol=SPLITS["protocol"],
    shell:
        "python -m hmil.splits {input.sheet:q} --folds {params.folds}"
        " --out {output.splits:q} --seed {params.seed} --hierarchy {params.hierarchy:q}"
        " --val-fraction {params.val_fraction} --protocol {params.protocol} > {log:q} 2>&1"
