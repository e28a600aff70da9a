rule fit_thresholds:
    input:
        unpack(calibration_inputs),
        model="results/models/{model}",
    output:
        "results/thresholds/{model}/{method}/grid.safetensors",
    params:
        method=lambda wc: method_of(wc.method),
        method_params=lambda wc: method_params(wc.method),
        # storeless: the forwards are the collection's (same batches, dtype and threads)
        seq_len=config["collection"]["seq_len"],
        batch_size=config["collection"]["batch_size"],
        dtype=config["dtype"],
    log:
        f"{LOGS}/fit_thresholds/{{model}}/{{method}}.log",
    resources:
        **(heavy_resources(mem_mb=8000, runtime=120) if STORELESS else dict(mem_mb=8000, runtime=60)),
    threads: config["threads"]
    cache: "omit-software"
    conda:
        ENV
    script:
        "../workflow_scripts/fit_thresholds.py"


rule allocate_greedy:
    input:
        model="results/models/{model}",
        corpus="results/corpora/{model}/calibration.safetensors",
        grid="results/thresholds/{model}/{method}/grid.safetensors",
    output:
        "results/thresholds/{model}/{method}/allocation.safetensors",
    params:
        method=lambda wc: method_of(wc.method),
        method_params=lambda wc: method_params(wc.method),
    log:
        f"{LOGS}/allocate_greedy/{{model}}/{{method}}.log",
    resources:
        mem_mb=8000,
        runtime=60,
    threads: config["threads"]
    cache: "omit-software"
    conda:
        ENV
    script:
        "../workflow_scripts/allocate_greedy.py"


rule select_thresholds:
    input:
        grid="results/thresholds/{model}/{method}/grid.safetensors",
        allocation=allocation_of,
    output:
        "results/thresholds/{model}/{method}/{sparsity}.safetensors",
    log:
        f"{LOGS}/select_thresholds/{{model}}/{{method}}/{{sparsity}}.log",
    localrule: True
    conda:
        ENV
    script:
        "../workflow_scripts/select_thresholds.py"
