"""actsparse: calibrate and evaluate training-free activation sparsity in LLMs."""

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"


rule all:
    default_target: True
    input:
        final_targets(),


include: "rules/models.smk"
include: "rules/corpora.smk"
include: "rules/collect.smk"
include: "rules/thresholds.smk"
include: "rules/perplexity.smk"
include: "rules/tasks.smk"
include: "rules/patterns.smk"
include: "rules/speed.smk"
include: "rules/report.smk"
