from actsparse import publish
from actsparse.runtime import job

with job(snakemake) as ctx:
    publish.build_table(
        snakemake.wildcards.table, snakemake.input, snakemake.output, provenance=ctx.provenance, **snakemake.params
    )
