from actsparse import stages
from actsparse.runtime import job

with job(snakemake) as ctx:
    stages.eval_task(
        model_dir=snakemake.input.model,
        thresholds=snakemake.input.thresholds,
        out_json=snakemake.output.result,
        out_loglikelihoods=snakemake.output.loglikelihoods,
        method=snakemake.wildcards.method,
        sparsity=float(snakemake.wildcards.sparsity),
        task=snakemake.wildcards.task,
        device=ctx.device,
        provenance=ctx.provenance,
        **snakemake.params,
    )
