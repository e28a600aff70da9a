from actsparse import pattern_study
from actsparse.runtime import job

with job(snakemake):
    pattern_study.pattern_tables(
        snakemake.input.match,
        snakemake.input.predictor,
        snakemake.input.prefetch,
        snakemake.input.latency,
        out_match=snakemake.output.match,
        out_table_ii=snakemake.output.table_ii,
        out_predictor=snakemake.output.predictor,
        out_prefetch=snakemake.output.prefetch,
        out_latency=snakemake.output.latency,
    )
