from actsparse import stages
from actsparse.runtime import job

with job(snakemake):
    stages.weights_table(snakemake.input[0], snakemake.output[0])
