from actsparse import stages
from actsparse.runtime import job

with job(snakemake):
    stages.stats_tables(snakemake.input.weights, snakemake.input.stats, snakemake.params.models, snakemake.output)
