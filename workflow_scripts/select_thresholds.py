from actsparse import stages
from actsparse.runtime import job

with job(snakemake):
    stages.select_thresholds(
        snakemake.input.grid,
        float(snakemake.wildcards.sparsity),
        snakemake.output[0],
        snakemake.input.allocation[0] if snakemake.input.allocation else None,
    )
