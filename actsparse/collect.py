"""Run a model over calibration text and write its activations into one store per shard, or,
storeless, only the shard's summary (``store.SummaryWriter``: statistics and magnitude counts).

Sequences: a shard's text tokens are cut into sequences of ``seq_len`` tokens, and every model
input is ``[BOS] + sequence`` (the convention of ``perplexity``: every input starts as the models
were trained to). The BOS position is dropped before storing, so a store holds exactly the
shard's text tokens, in corpus order: row ``i`` of every array is text token
``corpus_slice.token_start + i``.

Memory and overlap: hooks hand each (layer, component) value straight to the ``StoreWriter``,
whose background thread compresses and writes while the forward pass goes on. Its queue holds
at most one batch's worth of values (one entry per captured key), so memory stays bounded by
about two batches of activations: the one queued and the one the forward pass is producing.

Reruns: a store is written under ``<path>.partial`` and renamed only when complete, so an
interrupted collection leaves no store at ``path``; the next call deletes the partial one and
starts over. A call on an existing complete store replaces it (atomically, on success). A
summary is written atomically when complete, and an earlier one at its path deleted first.

The forward passes themselves (``shard_forwards``) are shared with the storeless fit, which
reruns them to read the same values again.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

import torch
import zarr
from torch import nn
from tqdm import tqdm

from actsparse.hooks import capture
from actsparse.store import STORED_DTYPES, SUMMARY_SUFFIX, CorpusSlice, StoreWriter, SummaryWriter


def shard_slices(n_tokens: int, shards: int, seq_len: int, corpus: str = "calibration") -> list[CorpusSlice]:
    """Split ``n_tokens`` into ``shards`` contiguous runs of whole ``seq_len``-token sequences.

    Remainder: the tail of fewer than ``seq_len`` tokens is left out, so every sequence, and
    every batch, has the same length. The whole sequences are spread as evenly as possible:
    the first ``sequences % shards`` shards get one more.
    """
    if shards < 1 or seq_len < 1:
        raise ValueError(f"shards ({shards}) and seq_len ({seq_len}) must be >= 1")
    sequences = n_tokens // seq_len
    if sequences < shards:
        raise ValueError(
            f"{n_tokens} tokens make {sequences} sequences of {seq_len}, fewer than {shards} shards"
        )
    per_shard, extra = divmod(sequences, shards)
    slices, start = [], 0
    for index in range(shards):
        stop = start + (per_shard + (index < extra)) * seq_len
        slices.append(CorpusSlice(corpus, index, shards, start, stop))
        start = stop
    return slices


def _stored_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in STORED_DTYPES:
            raise ValueError(f"stored dtype must be one of {sorted(STORED_DTYPES)}, got {dtype!r}")
        return STORED_DTYPES[dtype]
    return dtype


def _sequences(tokens: torch.Tensor, corpus_slice: CorpusSlice, seq_len: int) -> torch.Tensor:
    """The shard's text tokens as ``[sequences, seq_len]``, after checking they fit."""
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be the 1-D corpus token ids, got shape {list(tokens.shape)}")
    if corpus_slice.token_stop > len(tokens):
        raise ValueError(f"shard ends at token {corpus_slice.token_stop}, the corpus has {len(tokens)}")
    if corpus_slice.tokens % seq_len:
        raise ValueError(
            f"shard of {corpus_slice.tokens} tokens is not whole sequences of {seq_len}; use shard_slices"
        )
    return tokens[corpus_slice.token_start : corpus_slice.token_stop].long().view(-1, seq_len)


def _batches(sequences: torch.Tensor, bos_id: int, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """``[BOS] + sequence`` rows, ``batch_size`` at a time (the last batch may be smaller)."""
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size].to(device)
        bos = torch.full((len(batch), 1), bos_id, dtype=batch.dtype, device=device)
        yield torch.cat([bos, batch], dim=1)


def _one_zarr_worker_beside(device: torch.device) -> None:
    """Beside a forward pass on the CPU, zarr's chunk-encoding pool (sized for the whole machine)
    takes cores from it: at one torch thread on 2 cores, collection took 1.28-1.37x of a plain
    forward with the default pool and 1.04-1.10x with one worker (bench/bench_collect.py). zarr
    sizes its pool once per process, on first use, so this holds for the rest of the process."""
    if device.type == "cpu":
        zarr.config.set({"threading.max_workers": 1})


@contextmanager
def shard_forwards(
    model: nn.Module,
    tokens: torch.Tensor,
    corpus_slice: CorpusSlice,
    components: Iterable[str],
    seq_len: int,
    batch_size: int,
    bos_id: int,
    sink: Callable[[int, str, torch.Tensor], None],
    layers: Iterable[int] | None = None,
    desc: str | None = None,
) -> Iterator[Iterator[None]]:
    """Forward passes over one shard: inside the block, each step of the iterator it gives runs
    one batch, handing ``sink(layer, component, value)`` every captured value without its BOS
    position (``[sequences, seq_len, channels]``, sequences in corpus order).

    Collection and the storeless fit both run through here, so they see the same batches, hence
    the same values bit for bit. The inputs and the hooks are checked on entering, before the
    caller makes any file. ``desc`` shows a progress bar.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len + 1 > limit:
        raise ValueError(f"seq_len {seq_len} + BOS exceeds the model's {limit} positions")
    sequences = _sequences(tokens, corpus_slice, seq_len)
    device = next(model.parameters()).device

    def without_bos(layer: int, component: str, value: torch.Tensor) -> None:
        sink(layer, component, value[:, 1:])

    def run() -> Iterator[None]:
        batches = _batches(sequences, bos_id, batch_size, device)
        total = math.ceil(len(sequences) / batch_size)
        for batch in tqdm(batches, total=total, desc=desc, disable=desc is None):
            with torch.inference_mode():
                # the logits are not needed: the base model skips the vocabulary-sized LM head
                model.base_model(input_ids=batch, use_cache=False)
            yield

    with capture(model, components, without_bos, layers):
        yield run()


def collect_shard(
    model: nn.Module,
    tokens: torch.Tensor,
    corpus_slice: CorpusSlice,
    out_path: str | os.PathLike,
    components: Iterable[str],
    seq_len: int,
    batch_size: int,
    dtype: torch.dtype | str,
    provenance: Mapping[str, Any],
    model_name: str,
    bos_id: int,
    progress: bool = False,
    compression: str = "fast",
    summed: Collection[str] | None = None,
    counted: Collection[str] | None = None,
) -> None:
    """Write every layer's ``components`` over the shard's tokens into the store ``out_path``.

    ``tokens`` is the whole corpus (1-D token ids); ``corpus_slice`` picks the shard. ``dtype``
    is the stored dtype (float16, bfloat16 or float32, also by name). ``bos_id`` starts every
    sequence (``models.bos_id``, the one place that decides it). The path's suffix picks the
    backend (``.zarr`` or ``.h5``), and a path ending in ``.stats.safetensors`` writes no
    activations, only the shard's summary (``sources.SummaryWriter``: the storeless mode);
    ``compression`` is a store's codec (``store.COMPRESSIONS``). ``summed`` and ``counted``: the
    components whose channel sums the statistics keep and whose magnitudes a summary counts
    (``SummaryWriter``; None: all).
    """
    components = tuple(components)
    stored_dtype = _stored_dtype(dtype)
    device = next(model.parameters()).device
    writer_args = dict(model=model_name, corpus=corpus_slice, dtype=stored_dtype, provenance=provenance, summed=summed)

    def open_writer() -> StoreWriter | SummaryWriter:
        if str(out_path).endswith(SUMMARY_SUFFIX):
            return SummaryWriter(out_path, **writer_args, counted=counted)
        _one_zarr_worker_beside(device)
        return StoreWriter(
            out_path, **writer_args,
            token_block=seq_len,  # appends are whole sequences, so they never share a chunk
            queue_size=model.config.num_hidden_layers * len(components),  # one batch's worth
            overwrite=True, compression=compression,
        )

    # The sink finds the writer by the time a forward pass runs.
    with shard_forwards(model, tokens, corpus_slice, components, seq_len, batch_size, bos_id,
                        lambda *value: writer.append(*value),
                        desc=f"collect {model_name}" if progress else None) as forwards, \
            open_writer() as writer:
        for _ in forwards:
            pass
