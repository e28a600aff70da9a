from actsparse import stages
from actsparse.runtime import job

with job(snakemake) as ctx:
    stages.fit_thresholds(
        store_paths=snakemake.input.stores,
        model_dir=snakemake.input.model,
        method=snakemake.params.method,
        params=snakemake.params.method_params,
        out_path=snakemake.output[0],
        provenance=ctx.provenance,
    )
