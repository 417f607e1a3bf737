rule import_features:
    """Features made elsewhere (features.dirs) as thin features files: links, no copy."""
    input:
        sheet=config["slides"],
        sources=import_inputs,
    output:
        # none without imported encoders: every features path would be tried against
        # thousands of output patterns while planning
        features=expand(
            f"{OUTDIR}/features/{{{{encoder}}}}/{{slide}}.h5",
            slide=SLIDE_IDS if IMPORTED_ENCODERS else [],
        ),
        summary=f"{OUTDIR}/features/{{encoder}}/imported.csv",
    log:
        f"{OUTDIR}/logs/import_features/{{encoder}}.log",
    wildcard_constraints:
        encoder=alternatives(IMPORTED_ENCODERS),
    conda:
        "../../envs/features.yaml"
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(60),
        slurm_partition=slurm_partition(),
    params:
        source=lambda wildcards: IMPORTED[wildcards.encoder],
        out_dir=subpath(output.summary, parent=True),
        strict="--strict" if config["strict"] else "",
    shell:
        "python -m preprocessing.import_features {params.source:q} --sheet {input.sheet:q}"
        " --encoder {wildcards.encoder:q} --out-dir {params.out_dir:q} {params.strict}"
        " > {log:q} 2>&1"
