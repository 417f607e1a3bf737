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
        # The same folds in CLAM's layout (create_splits_seq.py), for CLAM-based tools.
        clam=expand(
            f"{OUTDIR}/splits/clam/splits_{{fold}}{{table}}.csv",
            fold=FOLDS,
            table=["", "_bool", "_descriptor"],
        ),
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
        clam_dir=lambda wildcards, output: Path(output.clam[0]).parent,
    shell:
        "python -m hmil.splits {input.sheet:q} --folds {params.folds}"
        " --out {output.splits:q} --seed {params.seed} --hierarchy {params.hierarchy:q}"
        " --val-fraction {params.val_fraction} --protocol {params.protocol}"
        " --clam-dir {params.clam_dir:q} > {log:q} 2>&1"
