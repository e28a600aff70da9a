from actsparse.methods import requirements


def collected_components():
    """Every component some configured method fits on (non-gated models skip `up` at run time)."""
    needed = {c for m in METHODS for c in requirements(m, method_params(m)).collect}
    return sorted(needed)


rule collect_activations:
    input:
        model="results/models/{model}",
        corpus="results/corpora/{model}/calibration.safetensors",
    output:
        store=directory(store_path("{model}", "{shard}")) if STORE_SUFFIX == "zarr" else store_path("{model}", "{shard}"),
        stats=store_path("{model}", "{shard}") + ".stats.safetensors",
    params:
        components=collected_components(),
        shards=config["collection"]["shards"],
        seq_len=config["collection"]["seq_len"],
        batch_size=config["collection"]["batch_size"],
        store_dtype=config["collection"]["dtype"],
        dtype=config["dtype"],
    log:
        f"{LOGS}/collect_activations/{{model}}/shard-{{shard}}.log",
    resources:
        **heavy_resources(mem_mb=8000, runtime=120),
    threads: config["threads"]
    cache: "omit-software"
    conda:
        ENV
    script:
        "../workflow_scripts/collect_activations.py"


rule weights_table:
    input:
        "results/models/{model}",
    output:
        "results/stats/{model}/weights.csv",
    log:
        f"{LOGS}/weights_table/{{model}}.log",
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        ENV
    script:
        "../workflow_scripts/weights_table.py"


rule stats_tables:
    input:
        weights=expand("results/stats/{model}/weights.csv", model=MODELS),
        stats=[store_path(m, k) + ".stats.safetensors" for m in MODELS for k in SHARDS],
    output:
        weights="results/tables/weights.csv",
        sparsity="results/tables/natural_sparsity.csv",
        cdf="results/tables/activation_cdf.csv",
        weights_figure="results/figures/weights.png",
        sparsity_figure="results/figures/natural_sparsity.png",
        cdf_figure="results/figures/activation_cdf.png",
        pdfs=multiext("results/figures/", "weights.pdf", "natural_sparsity.pdf", "activation_cdf.pdf"),
    params:
        models=MODELS,
    log:
        f"{LOGS}/stats_tables.log",
    conda:
        ENV
    script:
        "../workflow_scripts/stats_tables.py"
