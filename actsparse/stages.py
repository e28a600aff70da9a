"""One function per workflow stage: plain paths and parameters in, files out.

The workflow scripts only unpack the ``snakemake`` object and call these, so every stage can
be run and tested without Snakemake.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from actsparse import columns, corpora, models, perplexity
from actsparse.provenance import write_json

log = logging.getLogger(__name__)


def import_model(source: dict, out_dir: Path) -> None:
    log.info("importing model from %s into %s", source, out_dir)
    models.import_model(source, Path(out_dir))


def prepare_corpus(model_dir: Path, spec: dict, out_path: Path, provenance: dict) -> None:
    tokenizer = models.load_tokenizer(model_dir)
    text = corpora.load_text(spec)
    corpus = corpora.tokenize(text, tokenizer, spec.get("max_tokens"))
    log.info("corpus %s: %d tokens, %d words", spec, len(corpus["input_ids"]), corpus["words"])
    corpora.save_corpus(Path(out_path), corpus, {"source": spec, "provenance": provenance})


def eval_perplexity(
    model_dir: Path,
    corpus_path: Path,
    out_path: Path,
    method: str,
    sparsity: float,
    window: int,
    stride: int | None,
    batch_size: int,
    dtype: str,
    device: str,
    provenance: dict,
) -> dict:
    model, tokenizer = models.load_model(model_dir, device, dtype)
    corpus = corpora.load_corpus(corpus_path)
    window = min(window, model.config.max_position_embeddings)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    nll, scored = perplexity.sequence_nll(
        model, corpus["input_ids"], bos, window, stride, batch_size, progress=True
    )
    result = {
        "model": Path(model_dir).name,
        "method": method,
        "target_sparsity": sparsity,
        "achieved_sparsity": 0.0,
        "skipped_ffn_params": 0.0,
        **perplexity.perplexities(nll, scored, corpus["words"]),
        "window": window,
        "stride": stride or window - 1,
        "provenance": provenance,
    }
    log.info("ppl %.4f, word ppl %.4f over %d tokens", result["ppl"], result["word_ppl"], scored)
    write_json(Path(out_path), result)
    return result


def aggregate(result_paths: list[Path], table_columns: tuple[str, ...], out_csv: Path) -> pd.DataFrame:
    """Collect per-job JSON results into one table, sorted so reruns write identical bytes."""
    rows = [json.loads(Path(p).read_text()) for p in result_paths]
    frame = pd.DataFrame(rows, columns=list(table_columns))
    frame = frame.sort_values(list(table_columns[:3])).reset_index(drop=True)
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_csv, index=False)
    return frame


def aggregate_perplexity(result_paths: list[Path], out_csv: Path) -> pd.DataFrame:
    return aggregate(result_paths, columns.PERPLEXITY, out_csv)
