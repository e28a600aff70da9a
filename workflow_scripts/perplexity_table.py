from actsparse import stages
from actsparse.runtime import job

with job(snakemake):
    stages.perplexity_table(snakemake.input, snakemake.output.table, snakemake.output.figure, snakemake.output.cost)
