from snakemake.utils import validate


validate(config, "../config/schema/config.schema.yaml", set_default=True)

MODELS = list(config["models"])
CORPORA = ("calibration", "evaluation")
ENV = "../envs/actsparse.yaml"
LOGS = "results/logs"
BENCHMARKS = "results/benchmarks"


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    corpus="|".join(CORPORA),
    method=r"dense",
    sparsity=r"\d\.\d\d",


def sparsity_label(value):
    """Sparsity as it appears in paths: two decimals."""
    return f"{value:.2f}"


def ppl_results(model):
    return [f"results/eval/ppl/{model}/dense/{sparsity_label(0)}.json"]


def final_targets():
    return ["results/tables/perplexity.csv"]


def heavy_resources(mem_mb, runtime):
    """Resources of a job that runs a model: one GPU when the configured device is one."""
    res = dict(mem_mb=mem_mb, runtime=runtime)
    if config["device"] != "cpu":
        res["gpu"] = 1
    return res
