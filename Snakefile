"""actsparse: calibrate and evaluate training-free activation sparsity in LLMs."""

from snakemake.utils import min_version

min_version("9.0")


# The default config only when no --configfile is given: a user config stands alone over the
# schema's defaults, so its models and methods are all that run (extend the default config with
# `--configfile config/config.yaml my.yaml`).
if not workflow.overwrite_configfiles:

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
