rule import_model:
    output:
        directory("results/models/{model}"),
    params:
        source=lambda wc: config["models"][wc.model],
    log:
        f"{LOGS}/import_model/{{model}}.log",
    benchmark:
        f"{BENCHMARKS}/import_model/{{model}}.tsv"
    resources:
        mem_mb=8000,
        runtime=30,
    threads: config["threads"]
    conda:
        ENV
    script:
        "../workflow_scripts/import_model.py"
