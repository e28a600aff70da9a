from actsparse import stages
from actsparse.runtime import job

with job(snakemake) as ctx:
    stages.prepare_corpus(snakemake.input.model, snakemake.params.spec, snakemake.output[0], ctx.provenance)
