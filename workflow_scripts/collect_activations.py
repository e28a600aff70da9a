from actsparse import stages
from actsparse.runtime import job

with job(snakemake) as ctx:
    stages.collect_activations(
        model_dir=snakemake.input.model,
        corpus_path=snakemake.input.corpus,
        out_path=snakemake.output.get("store") or snakemake.output.stats,  # storeless: the summary
        shard=int(snakemake.wildcards.shard),
        device=ctx.device,
        provenance=ctx.provenance,
        **snakemake.params,
    )
