rule import_model:
    input:
        # a local checkout's or GGUF file's contents: a changed file re-imports the model
        lambda wc: model_files(config["models"][wc.model]),
    output:
        directory("results/models/{model}"),
    params:
        source=lambda wc: config["models"][wc.model],
    log:
        f"{LOGS}/import_model/{{model}}.log",
    resources:
        mem_mb=8000,
        runtime=30,
    threads: config["threads"]
    cache: "omit-software"
    conda:
        ENV
    script:
        "../workflow_scripts/import_model.py"
