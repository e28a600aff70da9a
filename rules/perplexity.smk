rule eval_perplexity:
    input:
        model="results/models/{model}",
        corpus="results/corpora/{model}/evaluation.safetensors",
        thresholds=thresholds_of,
    output:
        "results/eval/ppl/{model}/{method}/{sparsity}.json",
    params:
        window=config["perplexity"]["window"],
        stride=config["perplexity"]["stride"],
        batch_size=config["perplexity"]["batch_size"],
        sparsify_tokens=config["sparsify_tokens"],
        dtype=config["dtype"],
    log:
        f"{LOGS}/eval_perplexity/{{model}}/{{method}}/{{sparsity}}.log",
    benchmark:
        f"{BENCHMARKS}/eval_perplexity/{{model}}/{{method}}/{{sparsity}}.tsv"
    resources:
        **heavy_resources(mem_mb=8000, runtime=60),
    threads: config["threads"]
    conda:
        ENV
    script:
        "../workflow_scripts/eval_perplexity.py"


rule perplexity_table:
    input:
        ppl_results(),
    output:
        table="results/tables/perplexity.csv",
        figure=report(
            "results/figures/perplexity.png",
            caption="../report/figures/perplexity.rst",
            category="Perplexity",
            subcategory="Figures",
            labels={"figure": "Perplexity vs sparsity"},
        ),
        figure_pdf="results/figures/perplexity.pdf",
        cost=report(
            "results/figures/perplexity_cost.png",
            caption="../report/figures/perplexity_cost.rst",
            category="Perplexity",
            subcategory="Figures",
            labels={"figure": "Perplexity at equal cost"},
        ),
        cost_pdf="results/figures/perplexity_cost.pdf",
    log:
        f"{LOGS}/perplexity_table.log",
    conda:
        ENV
    script:
        "../workflow_scripts/perplexity_table.py"
