rule eval_task:
    input:
        model="results/models/{model}",
        thresholds=thresholds_of,
    output:
        result="results/eval/tasks/{model}/{method}/{sparsity}/{task}.json",
        loglikelihoods="results/eval/tasks/{model}/{method}/{sparsity}/{task}.loglikelihoods.safetensors",
    params:
        source=config["tasks"]["source"],
        limit=config["tasks"]["limit"],
        batch_size=config["tasks"]["batch_size"],
        sparsify_tokens=config["sparsify_tokens"],
        dtype=config["dtype"],
    log:
        f"{LOGS}/eval_task/{{model}}/{{method}}/{{sparsity}}/{{task}}.log",
    benchmark:
        f"{BENCHMARKS}/eval_task/{{model}}/{{method}}/{{sparsity}}/{{task}}.tsv"
    resources:
        **heavy_resources(mem_mb=8000, runtime=60),
    threads: config["threads"]
    conda:
        ENV
    script:
        "../workflow_scripts/eval_task.py"


rule downstream_table:
    input:
        task_results(),
    output:
        "results/tables/downstream.csv",
    log:
        f"{LOGS}/downstream_table.log",
    conda:
        ENV
    script:
        "../workflow_scripts/downstream_table.py"
