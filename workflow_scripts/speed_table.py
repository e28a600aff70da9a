from actsparse import stages
from actsparse.runtime import job

with job(snakemake):
    stages.speed_table(snakemake.input, snakemake.output[0])
