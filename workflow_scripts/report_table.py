from actsparse import views
from actsparse.runtime import job

with job(snakemake) as ctx:
    views.render(
        snakemake.wildcards.table, snakemake.input[0], snakemake.output, provenance=ctx.provenance, **snakemake.params
    )
