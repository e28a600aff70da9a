rule collect_activations:
    input:
        model="results/models/{model}",
        corpus="results/corpora/{model}/calibration.safetensors",
    output:
        **shard_outputs("{model}", "{shard}"),
    params:
        components=collected_components(),
        summed=summed_components(),
        counted=counted_components(),
        shards=config["collection"]["shards"],
        seq_len=config["collection"]["seq_len"],
        batch_size=config["collection"]["batch_size"],
        store_dtype=config["collection"]["dtype"],
        compression=config["collection"]["compression"],
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
        stats=[shard_stats(m, k) for m in MODELS for k in SHARDS],
    output:
        weights="results/tables/weights.csv",
        sparsity="results/tables/natural_sparsity.csv",
        cdf="results/tables/activation_cdf.csv",
        weights_figure=report(
            "results/figures/weights.png",
            caption="../report/figures/weights.rst",
            category="Weights and activations",
            subcategory="Figures",
            labels={"figure": "Weight magnitudes"},
        ),
        sparsity_figure=report(
            "results/figures/natural_sparsity.png",
            caption="../report/figures/natural_sparsity.rst",
            category="Weights and activations",
            subcategory="Figures",
            labels={"figure": "Natural activation sparsity"},
        ),
        cdf_figure=report(
            "results/figures/activation_cdf.png",
            caption="../report/figures/activation_cdf.rst",
            category="Weights and activations",
            subcategory="Figures",
            labels={"figure": "Activation magnitude CDFs"},
        ),
        pdfs=multiext("results/figures/", "weights.pdf", "natural_sparsity.pdf", "activation_cdf.pdf"),
    params:
        models=MODELS,
    log:
        f"{LOGS}/stats_tables.log",
    conda:
        ENV
    script:
        "../workflow_scripts/stats_tables.py"
