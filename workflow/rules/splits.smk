rule splits:
    input:
        sheet=config["slides"],
        hierarchy=HIERARCHY_FILE,
        published=PUBLISHED_SPLIT_FILES,
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
        args=split_arguments,
        clam_dir=lambda wildcards, output: Path(output.clam[0]).parent,
    shell:
        "python -m hmil.splits {input.sheet:q} --out {output.splits:q}"
        " --hierarchy {params.hierarchy:q} --clam-dir {params.clam_dir:q} {params.args}"
        " > {log:q} 2>&1"
