rule prepare_corpus:
    input:
        model="results/models/{model}",
        # a vendored corpus file: changed contents prepare the corpus again
        text=lambda wc: corpus_files(config["corpora"][wc.corpus]),
    output:
        "results/corpora/{model}/{corpus}.safetensors",
    params:
        spec=lambda wc: config["corpora"][wc.corpus],
    log:
        f"{LOGS}/prepare_corpus/{{model}}/{{corpus}}.log",
    resources:
        mem_mb=4000,
        runtime=10,
    threads: 1
    conda:
        ENV
    script:
        "../workflow_scripts/prepare_corpus.py"
