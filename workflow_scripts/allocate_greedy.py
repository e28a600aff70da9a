from actsparse import stages
from actsparse.runtime import job

with job(snakemake, device="cpu") as ctx:  # block runs of a small model: the CPU serves
    stages.allocate_greedy(
        model_dir=snakemake.input.model,
        corpus_path=snakemake.input.corpus,
        grid_path=snakemake.input.grid,
        method=snakemake.params.method,
        params=snakemake.params.method_params,
        out_path=snakemake.output[0],
        provenance=ctx.provenance,
    )
