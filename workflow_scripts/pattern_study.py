from actsparse import pattern_study
from actsparse.runtime import job

with job(snakemake) as ctx:
    pattern_study.run_match_study(
        model_dir=snakemake.input.model,
        corpus_path=snakemake.input.corpus,
        thresholds=snakemake.input.thresholds,
        out_table=snakemake.output.table,
        out_summary=snakemake.output.summary,
        heatmaps=snakemake.output.heatmaps,
        device=ctx.device,
        provenance=ctx.provenance,
        **snakemake.params,
    )
