from actsparse import stages
from actsparse.runtime import job

with job(snakemake):
    stages.import_model(snakemake.params.source, snakemake.output[0])
