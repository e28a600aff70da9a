rule decode_speed:
    input:
        model="results/models/{model}",
        corpus="results/corpora/{model}/evaluation.safetensors",
        thresholds="results/thresholds/{model}/{method}/{sparsity}.safetensors",
    output:
        "results/eval/speed/{model}/{method}/{sparsity}.json",
    params:
        prompt_tokens=config["speed"]["prompt_tokens"],
        new_tokens=config["speed"]["new_tokens"],
        repeats=config["speed"]["repeats"],
        kernel=config["speed"]["kernel"],
        dtype=config["dtype"],
    log:
        f"{LOGS}/decode_speed/{{model}}/{{method}}/{{sparsity}}.log",
    benchmark:
        f"{BENCHMARKS}/decode_speed/{{model}}/{{method}}/{{sparsity}}.tsv"
    resources:
        mem_mb=8000,
        runtime=30,
    threads: config["threads"]
    conda:
        ENV
    script:
        "../workflow_scripts/decode_speed.py"


rule speed_table:
    input:
        speed_results(),
    output:
        "results/tables/speed.csv",
    log:
        f"{LOGS}/speed_table.log",
    conda:
        ENV
    script:
        "../workflow_scripts/speed_table.py"
