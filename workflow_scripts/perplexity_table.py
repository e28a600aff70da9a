from actsparse import stages
from actsparse.runtime import job

with job(snakemake):
    stages.aggregate_perplexity(snakemake.input, snakemake.output[0])
