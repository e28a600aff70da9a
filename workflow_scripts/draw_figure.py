from actsparse import figures
from actsparse.runtime import job

with job(snakemake):
    figures.draw(snakemake.wildcards.figure, snakemake.input, snakemake.output.png)
