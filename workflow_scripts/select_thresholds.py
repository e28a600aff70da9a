from actsparse import stages
from actsparse.runtime import job

with job(snakemake):
    stages.select_thresholds(snakemake.input[0], float(snakemake.wildcards.sparsity), snakemake.output[0])
