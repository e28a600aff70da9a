import shutil

from actsparse.registry import configured, options, requirements

from actsparse.config import check_config, corpus_files, model_files
from actsparse.publish import drawn, figure_path
from actsparse import columns


# defaults from the schema, then every check that needs no model; in the order the files merge
check_config(config, [f for f in workflow.configfiles if f not in workflow.overwrite_configfiles]
             + list(workflow.overwrite_configfiles))

ENV = "../envs/actsparse.yaml"
LOGS = "results/logs"
BENCHMARKS = "results/benchmarks"
MODELS = list(config["models"])
METHODS = list(config["methods"])
CORPORA = ("calibration", "evaluation")
DENSE = columns.DENSE  # the dense baseline, at sparsity 0.00
SHARDS = range(config["collection"]["shards"])
STORELESS = config["collection"]["backend"] == "none"  # shard summaries only; fits rerun the forwards
STORE_SUFFIX = {"zarr": "zarr", "hdf5": "h5", "none": None}[config["collection"]["backend"]]


def alternatives(names):
    return "|".join(re.escape(name) for name in names)


wildcard_constraints:
    model=alternatives(MODELS),
    corpus=alternatives(CORPORA),
    method=alternatives(METHODS + [DENSE]),
    sparsity=r"0\.\d\d",
    shard=r"\d+",
    task=alternatives(config["tasks"]["names"]),


def label(sparsity):
    """Sparsity as it appears in paths: two decimals."""
    return f"{sparsity:.2f}"


def grid(methods, sparsities):
    """(method, sparsity label) points, the dense baseline first."""
    return [(DENSE, label(0))] + [(m, label(s)) for m in methods for s in sparsities]


def ppl_results():
    return [
        f"results/eval/ppl/{model}/{method}/{sparsity}.json"
        for model in MODELS
        for method, sparsity in grid(METHODS, config["sparsities"])
    ]


def task_results():
    return [
        f"results/eval/tasks/{model}/{method}/{sparsity}/{task}.json"
        for model in MODELS
        for method, sparsity in grid(config["tasks"]["methods"], config["tasks"]["sparsities"])
        for task in config["tasks"]["names"]
    ]


def speed_results():
    return [
        f"results/eval/speed/{model}/{method}/{label(sparsity)}.json"
        for model in MODELS
        for method in config["speed"]["methods"]
        for sparsity in config["speed"]["sparsities"]
    ]


def store_path(model, shard):
    return f"results/activations/{model}/calibration/shard-{shard}.{STORE_SUFFIX}"


def shard_stats(model, shard):
    """A calibration shard's statistics: beside its store, or the storeless shard summary."""
    if STORELESS:
        return f"results/activations/{model}/calibration/shard-{shard}.stats.safetensors"
    return store_path(model, shard) + ".stats.safetensors"


def shard_outputs(model, shard):
    """What a collection job writes: the store and its statistics, or the summary alone."""
    if STORELESS:
        return {"stats": shard_stats(model, shard)}
    store = store_path(model, shard)
    return {"store": directory(store) if STORE_SUFFIX == "zarr" else store, "stats": shard_stats(model, shard)}


def calibration_inputs(wildcards):
    """What a fit reads: the shard stores, or the shard summaries and the corpus to rerun the forwards on."""
    if STORELESS:
        return {
            "summaries": [shard_stats(wildcards.model, k) for k in SHARDS],
            "corpus": f"results/corpora/{wildcards.model}/calibration.safetensors",
        }
    return {"stores": [store_path(wildcards.model, k) for k in SHARDS]}


def method_of(name):
    """The registry method a config entry under methods configures."""
    return configured(name, config)[0]


def method_params(name):
    """A config entry's fit parameters, with those the workflow fills in (CHESS's per-sample
    quantiles take the calibration sequence length)."""
    return configured(name, config)[1]


def collected_components():
    """Every component some configured method fits on (non-gated models skip `up` at run time)."""
    return sorted({c for m in METHODS for c in requirements(*configured(m, config)).collect})


def summed_components():
    """The components whose channel sums some configured method reads for its scales (CHESS: up)."""
    needs = [requirements(*configured(m, config)) for m in METHODS]
    return sorted({c for r in needs for c in r.collect if c not in r.masks})


def counted_components():
    """The components some configured method thresholds: a storeless summary counts their
    magnitudes, from which a per-layer fit reads its thresholds without another forward."""
    return sorted({c for m in METHODS for c in requirements(*configured(m, config)).masks})


def allocation_of(wildcards):
    """The greedy allocation a method entry's levels are selected with; none for uniform."""
    if options(*configured(wildcards.method, config)).allocation == "uniform":
        return []
    return [f"results/thresholds/{wildcards.model}/{wildcards.method}/allocation.safetensors"]


def thresholds_of(wildcards):
    """The thresholds file of a grid point; none for the dense baseline."""
    if wildcards.method == DENSE:
        return []
    return [f"results/thresholds/{wildcards.model}/{wildcards.method}/{wildcards.sparsity}.safetensors"]


def final_targets():
    """Every table (the provenance table last) and the figures drawn from them."""
    targets = [
        "results/tables/perplexity.csv",
        "results/figures/perplexity.png",
        "results/figures/perplexity_cost.png",
        "results/tables/downstream.csv",
        "results/tables/weights.csv",
        "results/tables/natural_sparsity.csv",
        "results/tables/activation_cdf.csv",
        "results/tables/pattern_match.csv",
        "results/tables/pattern_match_table_ii.csv",
        "results/tables/predictor.csv",
        "results/tables/prefetch.csv",
        "results/tables/latency.csv",
        "results/tables/provenance.csv",  # built last, from every table's sidecar (rules/report.smk)
    ] + (["results/tables/speed.csv"] if config["speed"]["methods"] else [])
    return targets + [figure_path(name) for name in drawn(targets)]


def uses_gpu():
    """Whether model jobs run on a GPU: device cuda, or auto on a host with NVIDIA GPUs. (On a
    cluster whose submit host has no GPU, set device: cuda explicitly.)"""
    device = config["device"]
    return device.startswith("cuda") or (device == "auto" and shutil.which("nvidia-smi") is not None)


def heavy_resources(mem_mb, runtime):
    """Resources of a job that runs a model: one GPU when models run on GPUs, so
    `--resources gpu=K` bounds concurrent GPU jobs and CPU-only nodes never see a GPU request."""
    res = dict(mem_mb=mem_mb, runtime=runtime)
    if uses_gpu():
        res["gpu"] = 1
    return res
