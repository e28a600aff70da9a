PATTERNS = config["patterns"]
# the thresholds the study reads (check_config ensures the method is configured)
PATTERN_THRESHOLDS = f"results/thresholds/{{model}}/{PATTERNS['method']}/{label(PATTERNS['sparsity'])}.safetensors"


rule pattern_match:
    input:
        model="results/models/{model}",
        corpus="results/corpora/{model}/evaluation.safetensors",
        thresholds=PATTERN_THRESHOLDS,
    output:
        table="results/patterns/{model}/match.csv",
        summary="results/patterns/{model}/match.json",
        heatmaps=[
            report(
                f"results/figures/patterns/{{model}}/heatmaps_{strategy}.png",
                caption="../report/figures/heatmaps.rst",
                category="Activation patterns",
                subcategory="{model}",
                labels={"figure": f"Activation patterns, {strategy} edits"},
            )
            for strategy in PATTERNS["strategies"]
        ],
        heatmaps_pdf=expand("results/figures/patterns/{{model}}/heatmaps_{strategy}.pdf", strategy=PATTERNS["strategies"]),
    params:
        samples=PATTERNS["samples"],
        length=PATTERNS["length"],
        strategies=PATTERNS["strategies"],
        similarities=PATTERNS["similarities"],
        hot_fraction=PATTERNS["hot_fraction"],
        seed=PATTERNS["seed"],
        dtype=config["dtype"],
    log:
        f"{LOGS}/pattern_match/{{model}}.log",
    benchmark:
        f"{BENCHMARKS}/pattern_match/{{model}}.tsv"
    resources:
        **heavy_resources(mem_mb=8000, runtime=60),
    threads: config["threads"]
    conda:
        ENV
    script:
        "../workflow_scripts/pattern_study.py"


rule pattern_predictor:
    input:
        model="results/models/{model}",
        train_corpus="results/corpora/{model}/calibration.safetensors",
        eval_corpus="results/corpora/{model}/evaluation.safetensors",
        thresholds=PATTERN_THRESHOLDS,
    output:
        predictor="results/patterns/{model}/predictor.csv",
        prefetch="results/patterns/{model}/prefetch.csv",
        latency="results/patterns/{model}/latency.csv",
        summary="results/patterns/{model}/predictor.json",
        figure=report(
            "results/figures/patterns/{model}/prefetch.png",
            caption="../report/figures/prefetch.rst",
            category="Activation patterns",
            subcategory="{model}",
            labels={"figure": "Prefetch simulation"},
        ),
        figure_pdf="results/figures/patterns/{model}/prefetch.pdf",
        latency_figure=report(
            "results/figures/patterns/{model}/latency.png",
            caption="../report/figures/latency.rst",
            category="Activation patterns",
            subcategory="{model}",
            labels={"figure": "Prefetch latency model"},
        ),
        latency_figure_pdf="results/figures/patterns/{model}/latency.pdf",
    params:
        window=PATTERNS["length"],
        predictor=PATTERNS["predictor"],
        hot_fraction=PATTERNS["hot_fraction"],
        seed=PATTERNS["seed"],
        dtype=config["dtype"],
    log:
        f"{LOGS}/pattern_predictor/{{model}}.log",
    benchmark:
        f"{BENCHMARKS}/pattern_predictor/{{model}}.tsv"
    resources:
        **heavy_resources(mem_mb=8000, runtime=60),
    threads: config["threads"]
    conda:
        ENV
    script:
        "../workflow_scripts/pattern_predictor.py"


rule pattern_tables:
    input:
        match=expand("results/patterns/{model}/match.csv", model=MODELS),
        predictor=expand("results/patterns/{model}/predictor.csv", model=MODELS),
        prefetch=expand("results/patterns/{model}/prefetch.csv", model=MODELS),
        latency=expand("results/patterns/{model}/latency.csv", model=MODELS),
    output:
        match="results/tables/pattern_match.csv",
        table_ii="results/tables/pattern_match_table_ii.csv",
        predictor="results/tables/predictor.csv",
        prefetch="results/tables/prefetch.csv",
        latency="results/tables/latency.csv",
    log:
        f"{LOGS}/pattern_tables.log",
    conda:
        ENV
    script:
        "../workflow_scripts/pattern_tables.py"
