"""Sharded activation stores: one per calibration shard, written in the background, read in chunks.

Layout, the same for both backends (chosen by the path's suffix: ``.zarr`` for a zarr v3
directory, ``.h5`` for an HDF5 file):

* one 2-D array ``layers/{layer}/{component}`` of shape ``[tokens, channels]`` per key, chunked
  ``(token_block, channels)`` and compressed as ``compression`` says (see below);
* arrays are pre-sized: every key holds exactly the shard's token count
  (``CorpusSlice.token_stop - token_start``), which makes a short array detectable;
* float16 is stored as float16 (values past its range, 65504, become inf: use bfloat16 for
  models with massive activations). Neither zarr nor HDF5 has bfloat16, so bfloat16 is stored
  as its uint16 bit patterns; every array's ``dtype`` attribute names the logical dtype and the
  reader views the bits back to ``torch.bfloat16``, bit for bit;
* root attribute ``actsparse`` (a JSON string): format, model, corpus slice, dtype, token block
  and the caller's provenance;
* root attribute ``actsparse_complete`` (a JSON string), the completion marker: token count and
  every array's key and shape, written last.

Completion: a writer writes into ``<path>.partial`` and only a successful ``close()`` writes the
marker and renames it to ``<path>``; an interrupted writer leaves ``<path>.partial`` alone, which
the next writer for that path deletes first. ``open_store`` refuses a store without the marker,
with a missing array, with an array of another shape than recorded, or with missing chunks
(every chunk is written, even all-zero ones, so a stored-chunk count below the expected one means
lost data). Every chunk carries a checksum, checked as it is read: zarr's ``crc32c`` codec after
the compressor, HDF5's ``fletcher32`` filter; a chunk that does not read back is a ``StoreError``
naming the store, the array, the chunk and how to regenerate the store.

Compression (``compression=``, one of ``COMPRESSIONS``) is chosen per backend for its cost on
the writer thread. Measured on SmolLM2-135M float16 activations through each backend, writer
CPU ns per value and bytes per value (dense SiLU values; with 90% exact zeros, as ReLU models
give, zarr's ``"fast"`` stores ~1.0 B and ``"small"`` ~0.4 B):

===========  ==========================================  ==================================
             ``.zarr``                                   ``.h5``
===========  ==========================================  ==================================
``"fast"``   blosc-lz4, bit shuffle: ~6 ns, 1.86 B       uncompressed: ~2 ns, 2.00 B
``"small"``  blosc-zstd level 1, byte shuffle: ~8 ns,    gzip 1 + shuffle: ~60 ns, 1.74 B
             1.84 B
``"none"``   uncompressed: ~3 ns, 2.00 B                 uncompressed: ~2 ns, 2.00 B
===========  ==========================================  ==================================

``"fast"`` is the default: 16-bit activations are nearly incompressible (the low byte is noise),
so stronger codecs buy a few percent of disk for much more time, while lz4 still halves a store
of 90% zeros. HDF5 has no fast codec: h5py compresses holding the GIL, so its filters stall the
forward pass as well as the writer, and lzf (the fast one it ships) takes ~20 ns per value to
save under 1% on these values. gzip is ``"small"`` there because every HDF5 tool reads it.

Statistics: ``StoreWriter.stats`` (``actsparse.stats``) describe exactly the stored values, the
batch cast to the stored dtype. For a batch on the CPU, the writer thread computes them,
overlapping the forward pass (torch and numpy release the GIL); for a batch on a GPU, ``append``
summarizes it on the device (only the counts and per-channel sums move to the host) and the
writer thread folds the summary in. ``stats`` is complete once ``close()`` returns; ``close()``
saves it beside the store as ``<path>.stats.safetensors`` just before the rename. A batch the
statistics refuse (NaN values) fails the writer like a write error.

Memory: ``append`` casts the batch to the stored dtype into a fresh contiguous tensor (one pass
over the values), copies it to the host if it is on a GPU, and queues it; a background thread
summarizes and writes queued batches, so both overlap the model's forward pass. The queue is
bounded (``queue_size`` batches): at most ``queue_size + 1`` batches are held, and a full queue
makes ``append`` wait. Appends whose token counts are multiples of ``token_block`` write whole
chunks; others cost a read-modify-write of the chunk they share.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numcodecs
import numpy as np
import torch
import zarr
from safetensors import SafetensorError, safe_open
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from actsparse.provenance import damage_report
from actsparse.stats import PATTERNS, BatchSummary, Key, StoreStats, array_name, check_key, compressor, summarize

STORE_FORMAT = "actsparse.activations/1"
STORED_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Each stored dtype as numpy can hold it on disk: bfloat16 travels as its uint16 bit patterns.
_DISK_VIEW = {torch.float16: torch.float16, torch.bfloat16: torch.uint16, torch.float32: torch.float32}
_META_ATTR = "actsparse"
_MARKER_ATTR = "actsparse_complete"
SUMMARY_FORMAT = "actsparse.shard-summary/2"
SUMMARY_SUFFIX = ".stats.safetensors"  # a storeless shard's file: statistics and magnitude counts
_SUMMARY_ATTR = "actsparse_summary"
_PATTERNS_PART = "magnitude_patterns"
# A key's 32,768 int64 counts, as bytes: blosc-zstd with bit shuffle (~12 KB a key where the
# raw counts take 256 KiB; counts are mostly small and zero past the range the values reach).
_PATTERNS_CODEC = compressor()
_STOP = object()  # tells the writer thread that no more batches come
COMPRESSIONS = ("fast", "small", "none")


class StoreError(RuntimeError):
    """A store is incomplete, damaged, or its writer failed."""


@dataclass(frozen=True)
class CorpusSlice:
    """Which part of the calibration corpus a shard holds: tokens [token_start, token_stop)."""

    corpus: str
    shard_index: int
    shard_count: int
    token_start: int
    token_stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard index {self.shard_index} not in [0, {self.shard_count})")
        if not 0 <= self.token_start < self.token_stop:
            raise ValueError(f"bad token range [{self.token_start}, {self.token_stop})")

    @property
    def tokens(self) -> int:
        return self.token_stop - self.token_start


def partial_path(path: str | os.PathLike) -> Path:
    """Where the writer of ``path`` writes until it completes."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def stats_path(path: str | os.PathLike) -> Path:
    """Where the statistics of the store at ``path`` are saved."""
    path = Path(path)
    return path.with_name(path.name + ".stats.safetensors")


@dataclass(frozen=True)
class _Batch:
    """One queued append: host values in the stored dtype, and their summary if already made."""

    key: Key
    offset: int
    values: torch.Tensor
    summary: BatchSummary | None  # None: the writer thread summarizes ``values``


class _Zarr:
    """What differs between backends is here and in ``_Hdf5``; the rest of the module is shared."""

    # every chunk ends in its crc32c, checked when it is read (a flipped bit is an error, not data)
    codecs = {
        "fast": [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle), Crc32cCodec()],
        "small": [BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle), Crc32cCodec()],
        "none": [Crc32cCodec()],
    }

    @staticmethod
    def create(path: Path) -> zarr.Group:
        return zarr.open_group(path, mode="w", zarr_format=3)

    @staticmethod
    def open(path: Path) -> zarr.Group:
        return zarr.open_group(path, mode="r", zarr_format=3)

    @staticmethod
    def create_array(root: zarr.Group, name: str, shape: tuple[int, int], chunks: tuple[int, int],
                     dtype: np.dtype, compression: str) -> zarr.Array:
        return root.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, compressors=_Zarr.codecs[compression],
            config={"write_empty_chunks": True},  # a missing chunk must mean lost data
        )

    @staticmethod
    def stored_chunks(array: zarr.Array) -> int:
        return array.nchunks_initialized

    @staticmethod
    def close(root: zarr.Group) -> None:
        """Nothing to do: zarr writes every chunk and attribute when it is set."""


class _Hdf5:
    """HDF5 with the same names, chunks and attributes as ``_Zarr``."""

    codecs = {"fast": {}, "small": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
              "none": {}}

    @staticmethod
    def create(path: Path) -> h5py.File:
        return h5py.File(path, "w")

    @staticmethod
    def open(path: Path) -> h5py.File:
        return h5py.File(path, "r")

    @staticmethod
    def create_array(root: h5py.File, name: str, shape: tuple[int, int], chunks: tuple[int, int],
                     dtype: np.dtype, compression: str) -> h5py.Dataset:
        return root.create_dataset(  # fletcher32: every chunk's checksum, checked when it is read
            name, shape=shape, chunks=chunks, dtype=dtype, fletcher32=True, **_Hdf5.codecs[compression]
        )

    @staticmethod
    def stored_chunks(array: h5py.Dataset) -> int:
        return array.id.get_num_chunks()

    @staticmethod
    def close(root: h5py.File) -> None:
        root.close()


Backend = type[_Zarr] | type[_Hdf5]
_BACKENDS: dict[str, Backend] = {".zarr": _Zarr, ".h5": _Hdf5}


def _backend(path: Path) -> Backend:
    try:
        return _BACKENDS[path.suffix]
    except KeyError:
        raise ValueError(f"{path}: store paths end in {' or '.join(_BACKENDS)}") from None


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _DISK_VIEW:
        raise ValueError(f"stored dtype must be one of {', '.join(STORED_DTYPES)}, got {dtype}")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def stored_values(batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``[..., channels]`` batch as ``[tokens, channels]`` values of the stored dtype, on its
    device: the one cast every stored value, store statistic and storeless fit value goes
    through, so all of them see the same bits. A copy even when the dtype already matches: the
    model may reuse the tensor's memory."""
    values = batch.detach().to(dtype, copy=True, memory_format=torch.contiguous_format)
    return values.view(-1, batch.shape[-1])


class _KeyRows:
    """Tokens and channels appended per key, checked against the shard's token count."""

    def __init__(self, path: Path, tokens: int) -> None:
        self.path = path
        self.tokens = tokens
        self.rows: dict[Key, int] = {}  # tokens appended per key
        self.channels: dict[Key, int] = {}  # channels per key, fixed by its first append

    def add(self, layer: int, component: str, batch: torch.Tensor) -> tuple[Key, int]:
        """Count a batch of one key: (the key, the offset its tokens start at). A bad batch is
        refused here, on the caller's thread, where the error can name it."""
        key = check_key(layer, component)
        offset = self.rows.get(key, 0)
        if batch.ndim < 2:
            raise ValueError(f"batch must be [..., channels], got shape {list(batch.shape)}")
        channels = self.channels.get(key, batch.shape[-1])
        if batch.shape[-1] != channels:
            raise ValueError(
                f"layer {layer} {component}: batch has {batch.shape[-1]} channels, earlier ones "
                f"{channels}"
            )
        tokens = math.prod(batch.shape[:-1])
        if offset + tokens > self.tokens:
            raise ValueError(
                f"layer {layer} {component}: {offset} + {tokens} tokens exceed the shard's "
                f"{self.tokens}"
            )
        self.channels[key] = channels
        self.rows[key] = offset + tokens
        return key, offset

    def check_complete(self) -> None:
        if not self.rows:
            raise StoreError(f"{self.path}: no activations were appended")
        short = [f"layer {k[0]} {k[1]}: {n}" for k, n in self.rows.items() if n != self.tokens]
        if short:
            raise StoreError(f"{self.path}: keys short of {self.tokens} tokens: {', '.join(short)}")


class StoreWriter:
    """Writes one shard's activations; use as a context manager (an exception aborts).

    ``append`` may be called from the model's forward hooks directly: its signature matches a
    hook sink ``(layer, component, tensor)``, and tensors of shape ``[..., channels]`` are
    flattened to ``[tokens, channels]`` in row-major order. ``compression`` is one of
    ``COMPRESSIONS`` (see the module's docstring).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        model: str,
        corpus: CorpusSlice,
        dtype: torch.dtype = torch.float16,
        provenance: Mapping[str, Any] | None = None,
        token_block: int = 256,
        queue_size: int = 16,
        overwrite: bool = False,
        compression: str = "fast",
        summed: Collection[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._backend = _backend(self.path)
        _check_dtype(dtype)
        if token_block < 1 or queue_size < 1:
            raise ValueError(f"token_block {token_block} and queue_size {queue_size} must be >= 1")
        if compression not in COMPRESSIONS:
            known = ", ".join(COMPRESSIONS)
            raise ValueError(f"compression must be one of {known}, got {compression!r}")
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; remove it or pass overwrite=True")
        self.dtype = dtype
        self.tokens = corpus.tokens
        self.stats = StoreStats(summed)  # updated by the writer thread; complete after close()
        self._compression = compression
        self._chunk_rows = min(token_block, self.tokens)
        self._keys = _KeyRows(self.path, self.tokens)
        self._arrays: dict[str, Any] = {}  # open arrays, touched by the writer thread only
        metadata = json.dumps({
            "format": STORE_FORMAT, "model": model, "corpus": asdict(corpus),
            "dtype": _dtype_name(dtype), "token_block": self._chunk_rows,
            "provenance": dict(provenance or {}),
        })
        self._partial = partial_path(self.path)
        if self._partial.exists():
            _remove(self._partial)
        self._root = self._backend.create(self._partial)
        self._root.attrs[_META_ATTR] = metadata
        self._closed = False
        self._error: Exception | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        # A daemon: a writer never closed must not keep the interpreter from exiting.
        self._thread = threading.Thread(target=self._drain, name=f"write {self.path}", daemon=True)
        self._thread.start()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, layer: int, component: str, batch: torch.Tensor) -> None:
        """Queue the next tokens of one key; raises the background thread's error, if any."""
        self._check_open()
        key, offset = self._keys.add(layer, component, batch)
        values = stored_values(batch, self.dtype)
        summary = None if values.device.type == "cpu" else summarize(values, sums=self.stats.sums(component))
        self._queue.put(_Batch(key, offset, values.cpu(), summary))

    def close(self) -> None:
        """Finish writing, check every key got all tokens, mark complete and move into place."""
        if self._closed:
            return
        try:
            self._stop_thread()
            self._raise_thread_error()
            self._keys.check_complete()
            arrays = [
                {"layer": layer, "component": component, "shape": [self.tokens, channels]}
                for (layer, component), channels in self._keys.channels.items()
            ]
            self._root.attrs[_MARKER_ATTR] = json.dumps({"tokens": self.tokens, "arrays": arrays})
        finally:
            self._backend.close(self._root)
            self._closed = True
        self.stats.save(stats_path(self.path))
        if self.path.exists():  # overwrite=True was given
            _remove(self.path)
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Stop without completing: only ``<path>.partial`` remains, refused by ``open_store``."""
        if self._closed:
            return
        self._stop_thread()
        self._backend.close(self._root)
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the writer of {self.path} is closed")
        self._raise_thread_error()

    def _raise_thread_error(self) -> None:
        if self._error is not None:
            raise StoreError(f"writing {self._partial} failed: {self._error!r}") from self._error

    def _stop_thread(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _drain(self) -> None:
        """The writer thread; after an error it still takes batches, so ``append`` never hangs."""
        while (item := self._queue.get()) is not _STOP:
            if self._error is None:
                try:
                    self._write(item)
                except Exception as exc:  # handed to the caller at its next append or close
                    self._error = exc

    def _write(self, batch: _Batch) -> None:
        """Fold the batch into the statistics and write it into its array."""
        summary = summarize(batch.values, sums=self.stats.sums(batch.key[1])) if batch.summary is None else batch.summary
        self.stats.add(*batch.key, summary)
        rows = batch.values.view(_DISK_VIEW[self.dtype]).numpy()
        name = array_name(*batch.key)
        if name not in self._arrays:
            array = self._backend.create_array(
                self._root, name, (self.tokens, rows.shape[1]), (self._chunk_rows, rows.shape[1]),
                rows.dtype, self._compression,
            )
            array.attrs["dtype"] = _dtype_name(self.dtype)
            self._arrays[name] = array
        self._arrays[name][batch.offset : batch.offset + len(rows)] = rows


class SummaryWriter:
    """The storeless counterpart of ``StoreWriter``: one shard's statistics and, per key, the
    count of every magnitude bit pattern of its stored values, in one ``.stats.safetensors``
    file; no activations. Same ``append`` (a hook sink), same cast, same statistics bit for bit.

    A 16-bit float has 32,768 magnitudes, so these counts are the exact distribution of
    ``|x|``: every percentile of it, hence every per-layer threshold, follows from them without
    another forward pass (``quantiles.histogram_quantiles``). They are summed on the values'
    device (``stats.summarize``), so only the counts and per-channel sums leave a GPU, and are
    stored compressed (``_PATTERNS_CODEC``, named in the file's metadata): the file's size
    depends on the model's shape, not on the token count. ``counted`` limits the counts to the
    components a per-layer fit reads them for (the workflow: the masked ones), ``summed`` the
    channel sums to the components a method reads for its scales (``StoreStats``); None keeps
    both for every component. A fit over a key without counts makes its passes instead.

    Completion: the file is written once, atomically, by a successful ``close()`` and records
    the token count; an existing file is deleted first, so an interrupted writer leaves no
    summary at ``path`` (``open_summary`` refuses anything else).
    """

    def __init__(self, path: str | os.PathLike, *, model: str, corpus: CorpusSlice,
                 dtype: torch.dtype = torch.float16, provenance: Mapping[str, Any] | None = None,
                 summed: Collection[str] | None = None, counted: Collection[str] | None = None) -> None:
        self.path = Path(path)
        if not self.path.name.endswith(SUMMARY_SUFFIX):
            raise ValueError(f"{self.path}: shard summary paths end in {SUMMARY_SUFFIX}")
        _check_dtype(dtype)
        self.dtype = dtype
        self.tokens = corpus.tokens
        self.stats = StoreStats(summed)
        self.patterns: dict[Key, np.ndarray] = {}
        self._counted = None if counted is None else frozenset(counted)
        self._keys = _KeyRows(self.path, self.tokens)
        self._metadata = {
            "format": SUMMARY_FORMAT, "model": model, "corpus": asdict(corpus), "dtype": _dtype_name(dtype),
            "tokens": self.tokens, "provenance": dict(provenance or {}),
        }
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()

    def append(self, layer: int, component: str, batch: torch.Tensor) -> None:
        key, _ = self._keys.add(layer, component, batch)
        summary = summarize(stored_values(batch, self.dtype), sums=self.stats.sums(component))
        self.stats.add(*key, summary)
        if summary.patterns is None or not self._counts(component):  # float32: too many magnitudes to count each
            return
        if key in self.patterns:
            self.patterns[key] += summary.patterns
        else:
            self.patterns[key] = summary.patterns.copy()

    def _counts(self, component: str) -> bool:
        return self._counted is None or component in self._counted

    def close(self) -> None:
        """Check every key got all tokens, then write the file."""
        self._keys.check_complete()
        extra = {f"{array_name(*key)}/{_PATTERNS_PART}": np.frombuffer(_PATTERNS_CODEC.encode(counts), np.uint8)
                 for key, counts in self.patterns.items()}
        metadata = {**self._metadata, "patterns_codec": _PATTERNS_CODEC.get_config()}
        self.stats.save(self.path, extra, {_SUMMARY_ATTR: json.dumps(metadata)})


@dataclass(frozen=True)
class ShardSummary:
    """A storeless shard's summary (see ``SummaryWriter``), read back."""

    path: Path
    metadata: dict[str, Any]
    stats: StoreStats
    patterns: dict[Key, np.ndarray]  # int64 [32768] per key: values per magnitude bit pattern (16-bit dtypes)

    @property
    def tokens(self) -> int:
        return self.metadata["tokens"]

    @property
    def dtype(self) -> torch.dtype:
        return STORED_DTYPES[self.metadata["dtype"]]

    @property
    def corpus(self) -> CorpusSlice:
        return CorpusSlice(**self.metadata["corpus"])

    def keys(self) -> list[Key]:
        return list(self.stats)


def open_summary(path: str | os.PathLike) -> ShardSummary:
    """A complete shard summary; ``StoreError`` names the path and what is wrong otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no shard summary at {path}")
    try:
        with safe_open(path, framework="numpy") as file:
            header = file.metadata() or {}
            if _SUMMARY_ATTR not in header:
                raise StoreError(f"{path} is not a storeless shard summary (no {_SUMMARY_ATTR} entry)")
            metadata = json.loads(header[_SUMMARY_ATTR])
            keys = [check_key(*key) for key in json.loads(header["keys"])]
            if metadata.get("format") != SUMMARY_FORMAT:
                raise StoreError(f"{path}: format {metadata.get('format')!r}, expected {SUMMARY_FORMAT!r} "
                                 "(delete it and rerun the workflow to rewrite it)")
            names = set(file.keys())
            patterns = {key: _decoded_patterns(path, key, file.get_tensor(name)) for key in keys
                        if (name := f"{array_name(*key)}/{_PATTERNS_PART}") in names}
    except SafetensorError as exc:
        raise StoreError(f"{path}: damaged shard summary: {exc}") from exc
    counted = {key: int(counts.sum()) for key, counts in patterns.items()}
    stats = StoreStats.load(path)
    wrong = [key for key in keys if stats[key].count != metadata["tokens"] * stats[key].channels
             or counted.get(key, stats[key].count) != stats[key].count]
    if wrong:
        raise StoreError(f"{path}: keys {wrong} do not count {metadata['tokens']} tokens (damaged summary)")
    return ShardSummary(path, metadata, stats, patterns)


def _decoded_patterns(path: Path, key: Key, encoded: np.ndarray) -> np.ndarray:
    try:
        counts = np.frombuffer(_PATTERNS_CODEC.decode(encoded.tobytes()), dtype=np.int64)
    except (RuntimeError, ValueError) as exc:
        raise StoreError(f"{path}: key {key}: magnitude counts do not decompress (damaged summary): {exc}") from exc
    if counts.shape != (PATTERNS,):
        raise StoreError(f"{path}: key {key}: {counts.size} magnitude counts, expected {PATTERNS} (damaged summary)")
    return counts.copy()  # writable: the fit adds shards' counts


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class ActivationStore:
    """A complete store opened for reading (see ``open_store``)."""

    def __init__(self, path: Path, root: Any, backend: Backend, metadata: dict[str, Any],
                 marker: dict[str, Any]) -> None:
        self.path = path
        self.metadata = metadata
        self.tokens: int = marker["tokens"]
        self.dtype = STORED_DTYPES[metadata["dtype"]]
        self._shapes = {(a["layer"], a["component"]): tuple(a["shape"]) for a in marker["arrays"]}
        self._root = root
        self._backend = backend

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._backend.close(self._root)

    @property
    def corpus(self) -> CorpusSlice:
        return CorpusSlice(**self.metadata["corpus"])

    def keys(self) -> list[Key]:
        return sorted(self._shapes)

    def shape(self, layer: int, component: str) -> tuple[int, int]:
        return self._shapes[self._key(layer, component)]

    def iter_chunks(
        self, layer: int, component: str, rows: int | None = None
    ) -> Iterator[torch.Tensor]:
        """``[<= rows, channels]`` tensors in token order, checked before the first is read.

        ``rows`` defaults to the chunk height, the cheapest read.
        """
        name = array_name(*self._key(layer, component))
        array = self._root[name]
        step = array.chunks[0] if rows is None else rows
        if step < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        return self._read_blocks(name, array, step)

    def _read_blocks(self, name: str, array: Any, step: int) -> Iterator[torch.Tensor]:
        for start in range(0, self.tokens, step):
            try:
                block = array[start : start + step]
            except Exception as exc:
                raise StoreError(self._unreadable(name, array, start, step, exc)) from exc
            yield torch.from_numpy(block).view(self.dtype)

    def _unreadable(self, name: str, array: Any, start: int, step: int, error: Exception) -> str:
        """The damage report of a read that failed: the first chunk of the read that does not
        decode (its checksum, or its codec, fails) and why."""
        height = array.chunks[0]
        for chunk in range(start // height, math.ceil(min(start + step, self.tokens) / height)):
            try:
                array[chunk * height : (chunk + 1) * height]
            except Exception as exc:
                error = exc
                break
        else:
            chunk = start // height
        rows = f"tokens {chunk * height}-{min((chunk + 1) * height, self.tokens) - 1}"
        return damage_report(self.path, f"array {name}, chunk {chunk} ({rows}) does not read back ({error})")

    def stats(self) -> StoreStats:
        """The statistics its writer collected."""
        return StoreStats.load(stats_path(self.path))

    def _key(self, layer: int, component: str) -> Key:
        key = (layer, component)
        if key not in self._shapes:
            raise KeyError(f"{self.path} has no layer {layer} component {component!r}")
        return key


def open_store(path: str | os.PathLike) -> ActivationStore:
    """Open a complete store; ``StoreError`` names the path and what is wrong with it otherwise."""
    path = Path(path)
    backend = _backend(path)
    if not path.exists():
        if partial_path(path).exists():
            raise StoreError(f"{path} is incomplete: its writer was interrupted, only "
                             f"{partial_path(path)} exists; run the workflow again to regenerate it")
        raise FileNotFoundError(f"no store at {path}")
    try:
        root = backend.open(path)
    except Exception as exc:
        raise StoreError(damage_report(path, f"cannot open as {path.suffix} store: {exc!r}")) from exc
    try:
        metadata, marker = _read_attrs(path, root)
        _check_arrays(path, root, backend, marker)
    except BaseException:
        backend.close(root)
        raise
    return ActivationStore(path, root, backend, metadata, marker)


def _read_attrs(path: Path, root: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    if _MARKER_ATTR not in root.attrs:
        raise StoreError(damage_report(path, "it has no completion marker: its writer did not finish"))
    metadata = json.loads(root.attrs[_META_ATTR])
    if metadata.get("format") != STORE_FORMAT:
        raise StoreError(f"{path}: format {metadata.get('format')!r}, expected {STORE_FORMAT!r}")
    return metadata, json.loads(root.attrs[_MARKER_ATTR])


def _check_arrays(path: Path, root: Any, backend: Backend, marker: dict[str, Any]) -> None:
    """Catch truncation: every recorded array exists with its recorded shape and all its chunks."""
    for entry in marker["arrays"]:
        name = array_name(entry["layer"], entry["component"])
        if name not in root:
            raise StoreError(damage_report(path, f"array {name} is missing"))
        array = root[name]
        if list(array.shape) != entry["shape"]:
            raise StoreError(damage_report(
                path, f"{name} has shape {list(array.shape)}, the completion marker records {entry['shape']}"
            ))
        expected = math.prod(math.ceil(n / c) for n, c in zip(array.shape, array.chunks))
        stored = backend.stored_chunks(array)
        if stored != expected:
            raise StoreError(damage_report(path, f"{name} stores {stored} of its {expected} chunks"))
