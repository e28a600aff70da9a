"""Where a fit reads its calibration values: blocks of (layer, component) values in the stored dtype.

Two sources give the same blocks, bit for bit, so a fit's thresholds do not depend on which one
it reads (``methods.Calibration`` takes either):

* ``StoreSource``: the complete activation stores of the calibration shards (``collection.backend``
  zarr or hdf5). Each pass reads the arrays it needs from disk.
* ``ForwardSource``: no stores (``collection.backend: none``). Each pass runs the model over the
  calibration shards again, through the same forward code as collection (``collect.shard_forwards``:
  same batches, same cast ``store.stored_values``), so it sees the values a store would hold.
  Its statistics come from the shards' summaries (``store.SummaryWriter``), written by the
  shard jobs from their own forward; those also hold every key's count of each 16-bit
  magnitude, from which a magnitude stream's exact quantiles follow without any forward
  (``magnitude_counts``).

Block order: a store source yields shard after shard, key after key; a forward source yields
shard after shard, batch after batch, every key of a batch. Exact quantiles only count values,
so order does not matter to them; per-sample quantiles (``rows`` given) see, per key, the same
consecutive ``rows``-token blocks of each shard in the same order from both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn

from actsparse.stats import Key, StoreStats, pattern_magnitudes
from actsparse.store import ActivationStore, ShardSummary, open_store, open_summary, stored_values

Block = tuple[str, Key, torch.Tensor]  # (the shard it comes from, for errors; key; [rows, channels])
READ_VALUES = 1 << 20  # values per store read: large enough to amortise per-call costs


class BlockSource(Protocol):
    """What a fit reads: the shards' keys and statistics, and passes over their values."""

    stats: StoreStats  # merged over the shards
    tokens: int
    dtype: torch.dtype | None  # every shard's stored dtype (None: they differ)

    def shard_keys(self) -> list[tuple[str, list[Key]]]:
        """Per shard: its name and the keys it holds."""

    def blocks(self, keys: Sequence[Key], rows: int | None = None) -> Iterator[Block]:
        """One pass: every value of the keys once, in blocks of ``rows`` tokens (the last of a
        shard may be shorter), or of any size when ``rows`` is None."""

    def magnitude_counts(self, key: Key) -> tuple[np.ndarray, np.ndarray] | None:
        """(float32 magnitudes, int64 counts): the exact distribution of ``|x|`` of a key over
        every shard, when known without a pass; else None."""

    def close(self) -> None: ...


class StoreSource:
    """The complete shard stores at ``paths``, opened for reading."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        if isinstance(paths, (str, os.PathLike)) or not paths:
            raise ValueError(f"store_paths must be a non-empty list of store paths, got {paths!r}")
        self.stores: list[ActivationStore] = []
        try:
            for path in paths:
                self.stores.append(open_store(path))
            self.stats = StoreStats()
            for store in self.stores:
                self.stats.merge(store.stats())
        except BaseException:
            self.close()
            raise

    @property
    def tokens(self) -> int:
        return sum(store.tokens for store in self.stores)

    @property
    def dtype(self) -> torch.dtype | None:
        dtypes = {store.dtype for store in self.stores}
        return dtypes.pop() if len(dtypes) == 1 else None

    def shard_keys(self) -> list[tuple[str, list[Key]]]:
        return [(str(store.path), store.keys()) for store in self.stores]

    def blocks(self, keys: Sequence[Key], rows: int | None = None) -> Iterator[Block]:
        for store in self.stores:
            for key in keys:
                for chunk in store.iter_chunks(*key, rows=rows or _read_rows(store, key)):
                    yield str(store.path), key, chunk

    def magnitude_counts(self, key: Key) -> None:
        """Stores hold values, not counts: their fits read them."""
        return None

    def close(self) -> None:
        for store in self.stores:
            store.close()


def _read_rows(store: ActivationStore, key: Key) -> int:
    """Whole stored chunks adding up to about ``READ_VALUES`` values, so no chunk is read twice."""
    block = store.metadata["token_block"]
    return block * max(1, READ_VALUES // (block * store.shape(*key)[1]))


class ForwardSource:
    """Forward passes of ``model`` over the calibration shards whose summaries are at ``summary_paths``.

    ``tokens`` is the whole calibration corpus; ``seq_len``, ``batch_size`` and ``bos_id`` are
    the collection's, so every pass repeats the shard jobs' forwards. ``forwards`` counts the
    passes made (one pass: every shard once).

    ``pass2_bytes``: exact quantiles' pass-2 counts held at once (128 KiB per needed bucket,
    about one per level and key: 13 MiB a key for the 100-level grid). A store source holds
    512 MiB and sweeps the stores once per group of keys that fits; here a pass is a forward,
    so up to 4 GiB is held, one group for up to ~320 CHESS layers of the grid. The same budget
    decides whether CHESS's per-channel magnitude counts (32 KiB a channel, all layers at
    once) replace the sketch's two passes by one.
    """

    pass2_bytes = 1 << 32

    def __init__(self, model: nn.Module, tokens: torch.Tensor, summary_paths: Sequence[str | os.PathLike],
                 seq_len: int, batch_size: int, bos_id: int) -> None:
        if isinstance(summary_paths, (str, os.PathLike)) or not summary_paths:
            raise ValueError(f"summary_paths must be a non-empty list of paths, got {summary_paths!r}")
        self.summaries: list[ShardSummary] = [open_summary(path) for path in summary_paths]
        dtypes = {summary.dtype for summary in self.summaries}
        if len(dtypes) != 1:
            raise ValueError(f"the shard summaries hold different dtypes: {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        self.stats = StoreStats()
        for summary in self.summaries:
            self.stats.merge(summary.stats)
        self.forwards = 0
        self._model, self._tokens, self._seq_len, self._batch_size, self._bos = (
            model, tokens, seq_len, batch_size, bos_id)

    @property
    def tokens(self) -> int:
        return sum(summary.tokens for summary in self.summaries)

    def shard_keys(self) -> list[tuple[str, list[Key]]]:
        return [(str(summary.path), summary.keys()) for summary in self.summaries]

    def magnitude_counts(self, key: Key) -> tuple[np.ndarray, np.ndarray] | None:
        """From the summaries' counts of 16-bit magnitudes; None for float32 and for a key some
        summary did not count (its fit then makes the sketch's passes: the same thresholds)."""
        if self.dtype == torch.float32 or any(key not in summary.patterns for summary in self.summaries):
            return None
        counts = sum(summary.patterns[key] for summary in self.summaries)
        return pattern_magnitudes(self.dtype).numpy(), counts

    def blocks(self, keys: Sequence[Key], rows: int | None = None) -> Iterator[Block]:
        wanted = set(keys)
        for summary in self.summaries:
            yield from self._shard_blocks(summary, wanted, rows)
        self.forwards += 1

    def _shard_blocks(self, summary: ShardSummary, wanted: set[Key], rows: int | None) -> Iterator[Block]:
        """One shard's values of the wanted keys, captured batch by batch: at most one batch of
        them is held, plus, per key, fewer than ``rows`` tokens carried to the next batch."""
        from actsparse.collect import shard_forwards  # collect imports the store module, as this one

        captured: list[tuple[Key, torch.Tensor]] = []
        carried: dict[Key, torch.Tensor] = {}
        name = str(summary.path)

        def sink(layer: int, component: str, value: torch.Tensor) -> None:
            if (layer, component) in wanted:
                captured.append(((layer, component), stored_values(value, self.dtype)))

        components = sorted({c for _, c in wanted})
        layers = sorted({layer for layer, _ in wanted})
        with shard_forwards(self._model, self._tokens, summary.corpus, components, self._seq_len,
                            self._batch_size, self._bos, sink, layers) as forwards:
            for _ in forwards:
                for key, values in captured:
                    if rows is None:
                        yield name, key, values
                        continue
                    if key in carried:
                        values = torch.cat([carried.pop(key), values])
                    whole = len(values) - len(values) % rows
                    for start in range(0, whole, rows):
                        yield name, key, values[start : start + rows]
                    if whole < len(values):
                        carried[key] = values[whole:]
                captured.clear()
        for key, values in carried.items():
            yield name, key, values

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""
