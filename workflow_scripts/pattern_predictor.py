from actsparse import pattern_study
from actsparse.runtime import job

with job(snakemake) as ctx:
    pattern_study.run_predictor_study(
        model_dir=snakemake.input.model,
        train_corpus=snakemake.input.train_corpus,
        eval_corpus=snakemake.input.eval_corpus,
        thresholds=snakemake.input.thresholds,
        out_predictor=snakemake.output.predictor,
        out_prefetch=snakemake.output.prefetch,
        out_latency=snakemake.output.latency,
        out_summary=snakemake.output.summary,
        figure=snakemake.output.figure,
        latency_figure=snakemake.output.latency_figure,
        device=ctx.device,
        provenance=ctx.provenance,
        **snakemake.params,
    )
