from actsparse import stages
from actsparse.runtime import job

with job(snakemake) as ctx:
    stages.fit_thresholds(
        calibration=snakemake.input.get("stores") or snakemake.input.summaries,
        model_dir=snakemake.input.model,
        method=snakemake.params.method,
        params=snakemake.params.method_params,
        out_path=snakemake.output[0],
        provenance=ctx.provenance,
        corpus_path=snakemake.input.get("corpus"),
        seq_len=snakemake.params.seq_len,
        batch_size=snakemake.params.batch_size,
        dtype=snakemake.params.dtype,
        device=ctx.device,
    )
