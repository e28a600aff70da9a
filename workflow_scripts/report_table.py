from actsparse import formats
from actsparse.runtime import job

with job(snakemake) as ctx:
    formats.render(snakemake.input[0], snakemake.output, provenance=ctx.provenance, **snakemake.params)
