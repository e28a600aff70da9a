"""One function per workflow stage: plain paths and parameters in, files out.

The workflow scripts only unpack the ``snakemake`` object and call these, so every stage can
be run and tested without Snakemake.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save

from actsparse import columns, compiled_step, corpora, hooks, kernels, methods, perplexity, sparsifier
from actsparse.anatomy import anatomy_of
from actsparse.provenance import write_json, write_safetensors, write_text

# The modules that load transformers, pandas, matplotlib or datasets are imported by the stages
# that use them: every workflow job is a fresh process, and importing all of them cost each of
# the default run's ~100 jobs seconds that most of them never use.
if TYPE_CHECKING:
    import pandas as pd

# evaluation tokens a sparsifier acts on: all of them, or TEAL's last half of each input
TOKEN_SELECTIONS = {"all": None, "last_half": hooks.last_fraction(0.5)}

log = logging.getLogger(__name__)


def import_model(source: dict, out_dir: Path) -> None:
    from actsparse import models

    log.info("importing model from %s into %s", source, out_dir)
    models.import_model(source, Path(out_dir))


def prepare_corpus(model_dir: Path, spec: dict, out_path: Path, provenance: dict) -> None:
    from actsparse import models

    tokenizer = models.load_tokenizer(model_dir)
    text = corpora.load_text(spec)
    corpus = corpora.tokenize(text, tokenizer, spec.get("max_tokens"))
    log.info("corpus %s: %d tokens, %d words", spec, len(corpus["input_ids"]), corpus["words"])
    corpora.save_corpus(Path(out_path), corpus, {"source": spec, "provenance": provenance})


def collect_activations(
    model_dir: Path,
    corpus_path: Path,
    out_path: Path,
    shard: int,
    shards: int,
    components: list[str],
    seq_len: int,
    batch_size: int,
    store_dtype: str,
    compression: str,
    dtype: str,
    device: str,
    provenance: dict,
    summed: list[str] | None = None,
    counted: list[str] | None = None,
) -> None:
    """One calibration shard: a store, or (``out_path`` a summary) the storeless summary; channel
    sums for ``summed``, magnitude counts for ``counted`` (None: every component)."""
    from actsparse import collect, models

    model, tokenizer = models.load_model(model_dir, device, dtype)
    components = [c for c in components if c in anatomy_of(model).components]  # non-gated: no `up`
    tokens = corpora.load_corpus(corpus_path)["input_ids"]
    shard_slice = collect.shard_slices(len(tokens), shards, seq_len)[shard]
    log.info("collecting %s over tokens %d..%d", components, shard_slice.token_start, shard_slice.token_stop)
    collect.collect_shard(
        model, tokens, shard_slice, out_path, components, seq_len, batch_size, store_dtype, provenance,
        Path(model_dir).name, models.bos_id(tokenizer), progress=True, compression=compression,
        summed=summed, counted=counted,
    )


def weights_table(model_dir: Path, out_csv: Path) -> None:
    from actsparse import models, summaries

    model, _ = models.load_model(model_dir)
    histogram = summaries.weight_histogram(model, Path(model_dir).name)
    _write_csv(histogram, out_csv)


def stats_tables(weight_csvs: list[Path], stats_paths: list[Path], model_names: list[str], outputs) -> None:
    """The seed paper's Figs 2-7 for every model: weight magnitudes, natural sparsity and |x| CDFs
    (from the statistics gathered while collecting, merged over each model's shards)."""
    import pandas as pd
    from actsparse import summaries

    weights = pd.concat([pd.read_csv(p) for p in weight_csvs], ignore_index=True)
    sparsity, cdf = [], []
    for name in model_names:
        merged = summaries.merge_stats([p for p in stats_paths if f"/{name}/" in str(p)])
        sparsity.append(summaries.natural_sparsity(merged, name))
        cdf.append(summaries.activation_cdf(merged, name))
    sparsity, cdf = pd.concat(sparsity, ignore_index=True), pd.concat(cdf, ignore_index=True)
    for frame, csv, figure, plot in (
        (weights, outputs.weights, outputs.weights_figure, summaries.plot_weight_histogram),
        (sparsity, outputs.sparsity, outputs.sparsity_figure, summaries.plot_natural_sparsity),
        (cdf, outputs.cdf, outputs.cdf_figure, summaries.plot_activation_cdf),
    ):
        _write_csv(frame, csv)
        plot(frame, [figure, Path(figure).with_suffix(".pdf")])


def fit_thresholds(
    calibration: list[Path],
    model_dir: Path,
    method: str,
    params: dict,
    out_path: Path,
    provenance: dict,
    corpus_path: Path | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    dtype: str = "auto",
    device: str = "cpu",
) -> None:
    """Thresholds of every representable sparsity (0.00 to 0.99) from the same passes over the
    calibration. The grid does not depend on the configured levels, so adding a level never
    reruns this fit or anything downstream of the other levels.

    ``calibration``: the shard stores, or (storeless, ``corpus_path`` given) the shard summaries;
    the passes then rerun the collection's forwards (its ``seq_len`` and ``batch_size``, the
    model on ``device`` in ``dtype``) over the calibration corpus."""
    from actsparse import models, sources

    gated = models.load_anatomy(model_dir).gated
    norms = None
    if methods.needs_weights(method):  # from the float32 checkpoint, whatever dtype the forwards use
        weights, _ = models.load_model(model_dir, "cpu", "float32")
        norms = hooks.input_column_norms(weights, methods.requirements(method, params, gated=gated).masks)
        del weights
    source = calibration
    if corpus_path is not None:
        model, tokenizer = models.load_model(model_dir, device, dtype)
        tokens = corpora.load_corpus(corpus_path)["input_ids"]
        source = sources.ForwardSource(model, tokens, calibration, seq_len, batch_size, models.bos_id(tokenizer))
    fitted = methods.fit(method, source, methods.GRID, params, gated=gated, column_norms=norms)
    metadata = methods.fit_metadata(method, 0.0, source, params, provenance)
    methods.save_grid(out_path, fitted, metadata)
    if corpus_path is not None:
        log.info("storeless fit: %d forward passes over the calibration shards", source.forwards)


def select_thresholds(grid_path: Path, sparsity: float, out_path: Path, allocation_path: Path | None = None) -> None:
    """One level's thresholds: the grid's at that level, or with a greedy allocation each key's
    at its allocated level."""
    if allocation_path is None:
        thresholds, metadata = methods.load_grid(grid_path, sparsity)
    else:
        thresholds, metadata = methods.load_allocated(grid_path, allocation_path, sparsity)
    methods.save_thresholds(out_path, thresholds, metadata | {"target_sparsity": sparsity})


def allocate_greedy(
    model_dir: Path, corpus_path: Path, grid_path: Path, method: str, params: dict, out_path: Path, provenance: dict
) -> None:
    """The greedy allocation of every level of a method's grid (``actsparse.allocation``), on the
    first calibration tokens after BOS."""
    from actsparse import allocation, models

    model, tokenizer = models.load_model(model_dir, "cpu", "float32")
    kv_dense = methods.requirements(method, params, gated=anatomy_of(model).gated).kv_dense
    text = corpora.load_corpus(corpus_path)["input_ids"][: allocation.SEARCH_TOKENS - 1]
    ids = torch.cat([torch.tensor([models.bos_id(tokenizer)]), text])[None]
    grid, levels, _ = methods.read_grid(grid_path)
    allocated = allocation.allocate(model, ids, grid, levels, kv_dense)
    metadata = {"method": method, "params": params, "search_tokens": ids.shape[1], "step": allocation.STEP,
                "provenance": provenance}
    methods.save_allocation(out_path, allocated, levels, metadata)


def eval_perplexity(
    model_dir: Path,
    corpus_path: Path,
    out_path: Path,
    method: str,
    sparsity: float,
    thresholds: list[Path],
    window: int,
    stride: int | None,
    batch_size: int,
    sparsify_tokens: str,
    dtype: str,
    device: str,
    provenance: dict,
) -> dict:
    from actsparse import models

    model, tokenizer = models.load_model(model_dir, device, dtype)
    corpus = corpora.load_corpus(corpus_path)
    window = min(window, model.config.max_position_embeddings)
    bos = models.bos_id(tokenizer)
    with sparsified(model, thresholds, sparsify_tokens) as measured:
        nll, scored = perplexity.sequence_nll(
            model, corpus["input_ids"], bos, window, stride, batch_size, progress=True
        )
    result = {
        "model": Path(model_dir).name,
        "method": method,
        "target_sparsity": sparsity,
        **_achieved(model, measured),
        **perplexity.perplexities(nll, scored, corpus["words"]),
        "window": window,
        "stride": stride or window - 1,
        "sparsify_tokens": sparsify_tokens,
        "provenance": provenance,
    }
    log.info("ppl %.4f, word ppl %.4f over %d tokens", result["ppl"], result["word_ppl"], scored)
    write_json(Path(out_path), result)
    return result


def eval_task(
    model_dir: Path,
    out_json: Path,
    out_loglikelihoods: Path,
    method: str,
    sparsity: float,
    task: str,
    thresholds: list[Path],
    source: str,
    limit: int | None,
    batch_size: int,
    sparsify_tokens: str,
    dtype: str,
    device: str,
    provenance: dict,
) -> dict:
    from actsparse import models, tasks

    model, tokenizer = models.load_model(model_dir, device, dtype)
    docs = tasks.load_task(task, source, limit=limit)
    with sparsified(model, thresholds, sparsify_tokens) as measured:
        scored = tasks.score_docs(model, tokenizer, docs, batch_size)
    result = {
        "model": Path(model_dir).name,
        "method": method,
        "target_sparsity": sparsity,
        "task": task,
        "acc": scored.acc,
        "acc_stderr": scored.acc_stderr,
        "acc_norm": scored.acc_norm,
        "acc_norm_stderr": scored.acc_norm_stderr,
        "n": scored.n,
        **_achieved(model, measured),
        "source": source,
        "limit": limit,
        "provenance": provenance,
    }
    log.info("%s: acc %.4f, acc_norm %.4f over %d docs", task, scored.acc, scored.acc_norm, scored.n)
    _save_loglikelihoods(out_loglikelihoods, docs, scored.loglikelihoods)
    write_json(Path(out_json), result)
    return result


def decode_speed(
    model_dir: Path,
    corpus_path: Path,
    thresholds: Path,
    out_path: Path,
    method: str,
    sparsity: float,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    kernel: str,
    dtype: str,
    provenance: dict,
) -> dict:
    """Dense vs sparse decoding tokens/s of one grid point on the CPU (the native kernels' device;
    on a GPU only PyTorch's gathers run, which bench/bench_decode.py --device cuda times), after checking that every sparse kernel computes the masked dense
    model's output of its input (``kernels.sparse_vs_masked``; how many greedy tokens came out
    alike is recorded); then the same model's decoder layers as one C call each
    (``compiled_step``, where its family has one), checked against PyTorch first. The prompt is
    ``[BOS]`` + the first evaluation tokens."""
    from actsparse import models

    model, tokenizer = models.load_model(model_dir, "cpu", dtype, own_memory=True)
    text = corpora.load_corpus(corpus_path)["input_ids"][: prompt_tokens - 1]
    prompt = torch.cat([torch.tensor([models.bos_id(tokenizer)]), text])
    values, metadata = methods.load_thresholds(thresholds)
    kv_dense = methods.requirements(metadata["method"], gated=anatomy_of(model).gated).kv_dense
    agreement = kernels.sparse_vs_masked(model, values, prompt, min(new_tokens, 16), kernel, kv_dense)
    speed = kernels.decode_speed(model, values, prompt, new_tokens, repeats, kernel=kernel, kv_dense=kv_dense)
    speed |= compiled_step.compiled_speed(model, values, prompt, new_tokens, repeats, kv_dense)
    result = {
        "model": Path(model_dir).name, "method": method, "sparsity": sparsity, "device": "cpu", **speed,
        **dataclasses.asdict(agreement), "prompt_tokens": len(prompt), "new_tokens": new_tokens,
        "repeats": repeats, "kernel": kernel, "threads": torch.get_num_threads(), "provenance": provenance,
    }
    log.info("%s %.2f: dense %.1f tok/s, sparse %.1f tok/s, speedup %.3f (%.3f over the dense model on the kernels' "
             "engine, %.3f over the kernels keeping every channel; fair %.3f; dense weights streamed at %.1f GB/s); "
             "compiled step %.3f", method, sparsity, speed["dense_tps"], speed["sparse_tps"], speed["speedup"],
             speed["native_speedup"], speed["kernel_speedup"], speed["fair_speedup"], speed["native_dense_gbps"],
             speed["compiled_speedup"])
    write_json(Path(out_path), result)
    return result


@contextmanager
def sparsified(model, thresholds: list[Path], sparsify_tokens: str) -> Iterator[sparsifier.Measured]:
    """The model masked by the thresholds file (none: the dense baseline), measuring its zeros."""
    if not thresholds:
        values, kv_dense = {}, False
    else:
        values, metadata = methods.load_thresholds(thresholds[0])
        kv_dense = methods.requirements(metadata["method"], gated=anatomy_of(model).gated).kv_dense
    with sparsifier.sparsified(model, values, kv_dense, TOKEN_SELECTIONS[sparsify_tokens]) as measured:
        yield measured


def _achieved(model, measured: sparsifier.Measured) -> dict:
    return {
        "achieved_sparsity": sparsifier.achieved_sparsity(measured),
        "skipped_ffn_params": sparsifier.skipped_ffn_fraction(model, measured),
        "layer_sparsity": sparsifier.layer_sparsity(measured),
    }


def _save_loglikelihoods(path: Path, docs: list, loglikelihoods) -> None:
    """Per-example choice log-likelihoods, compact: [docs, max choices] padded with NaN, and gold."""
    width = max(len(d.contexts) for d in docs)
    table = torch.full((len(docs), width), float("nan"), dtype=torch.float64)
    for row, values in enumerate(loglikelihoods):
        table[row, : len(values)] = torch.as_tensor(values, dtype=torch.float64)
    gold = torch.tensor([d.gold for d in docs], dtype=torch.int64)
    write_safetensors(Path(path), save({"loglikelihoods": table, "gold": gold}))


def _write_csv(frame: pd.DataFrame, out_csv: Path) -> None:
    write_text(Path(out_csv), frame.to_csv(index=False))


def perplexity_table(result_paths: list[Path], out_csv: Path, out_png: Path, cost_png: Path) -> pd.DataFrame:
    """The perplexity table, its figure against target sparsity, and the one against what each
    grid point costs (activated FFN parameters, achieved sparsity)."""
    from actsparse import tables

    frame = tables.collect_results(result_paths, columns.PERPLEXITY)
    _write_csv(frame, out_csv)
    tables.plot_perplexity(frame, out_png)
    tables.plot_perplexity_at_cost(frame, cost_png)
    return frame


def speed_table(result_paths: list[Path], out_csv: Path) -> pd.DataFrame:
    from actsparse import tables

    frame = tables.collect_results(result_paths, columns.SPEED)
    _write_csv(frame, out_csv)
    return frame


def downstream_table(result_paths: list[Path], out_csv: Path) -> pd.DataFrame:
    from actsparse import tables

    frame = tables.downstream(result_paths)
    _write_csv(frame, out_csv)
    return frame
