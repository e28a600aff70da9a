from actsparse import stages
from actsparse.runtime import job

with job(snakemake, device="cpu") as ctx:  # sparse decode kernels exist for the CPU only
    stages.decode_speed(
        model_dir=snakemake.input.model,
        corpus_path=snakemake.input.corpus,
        thresholds=snakemake.input.thresholds,
        out_path=snakemake.output[0],
        method=snakemake.wildcards.method,
        sparsity=float(snakemake.wildcards.sparsity),
        provenance=ctx.provenance,
        **snakemake.params,
    )
