from actsparse import stages
from actsparse.runtime import job

with job(snakemake) as ctx:
    stages.eval_perplexity(
        model_dir=snakemake.input.model,
        corpus_path=snakemake.input.corpus,
        thresholds=snakemake.input.thresholds,
        out_path=snakemake.output[0],
        method=snakemake.wildcards.method,
        sparsity=float(snakemake.wildcards.sparsity),
        device=ctx.device,
        provenance=ctx.provenance,
        **snakemake.params,
    )
