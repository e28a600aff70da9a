"""Threshold, statistics and corpus files carry a checksum of their header and tensors: a flipped
bit is an error naming the file and how to regenerate it, never a silently different value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from actsparse.corpora import load_corpus, save_corpus
from actsparse.methods import load_thresholds, save_thresholds
from actsparse.provenance import CHECKSUM, DamagedFileError
from actsparse.stats import StoreStats


def thresholds_file(path: Path) -> None:
    save_thresholds(path, {(0, "act"): 0.207, (1, "h"): np.linspace(0.1, 0.4, 8)}, {"target_sparsity": 0.5})


def stats_file(path: Path) -> None:
    stats = StoreStats()
    stats.update(0, "act", torch.randn(50, 8, generator=torch.Generator().manual_seed(0)).half())
    stats.save(path)


def corpus_file(path: Path) -> None:
    save_corpus(path, {"input_ids": torch.arange(1, 40, dtype=torch.int32), "words": 30, "characters": 150},
                {"source": "test"})


def read_thresholds(path: Path) -> object:
    return load_thresholds(path)


KINDS = {
    "thresholds": (thresholds_file, read_thresholds),
    "stats": (stats_file, StoreStats.load),
    "corpus": (corpus_file, load_corpus),
}


def tensor_bytes_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("kind", KINDS)
def test_a_written_file_reads_back_and_records_the_checksum(tmp_path, kind):
    write, read = KINDS[kind]
    path = tmp_path / f"{kind}.safetensors"
    write(path)
    read(path)
    with safe_open(path, framework="numpy") as file:
        assert file.metadata()[CHECKSUM].startswith("sha256:")


@pytest.mark.parametrize("kind", KINDS)
def test_a_flipped_tensor_bit_names_the_file_and_how_to_regenerate_it(tmp_path, kind):
    write, read = KINDS[kind]
    path = tmp_path / f"{kind}.safetensors"
    write(path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) - 2] ^= 0x01  # the high bytes of the last value: a different number, still readable
    path.write_bytes(bytes(raw))
    with pytest.raises(DamagedFileError) as error:
        read(path)
    message = str(error.value)
    assert message.startswith(f"{path} is damaged: its checksum does not match its contents")
    assert f"`rm {path}`, then run the workflow again" in message


def test_damaged_compressed_channel_sums_name_the_file_before_they_are_decoded(tmp_path):
    path = tmp_path / "stats.safetensors"
    stats_file(path)
    with safe_open(path, framework="numpy") as file:
        assert "layers/0/act/sum_abs.blosc" in file.keys()
    raw = bytearray(path.read_bytes())
    header = json.loads(raw[8 : tensor_bytes_start(path)])
    start, _ = header["layers/0/act/sum_abs.blosc"]["data_offsets"]
    raw[tensor_bytes_start(path) + start + 4] ^= 0xFF  # the blosc header's size field: undecodable
    path.write_bytes(bytes(raw))
    with pytest.raises(DamagedFileError, match=f"{path} is damaged: its checksum does not match"):
        StoreStats.load(path)


def test_a_changed_metadata_value_is_caught_too(tmp_path):
    path = tmp_path / "thresholds.safetensors"
    thresholds_file(path)
    raw = path.read_bytes()
    header = raw[8 : tensor_bytes_start(path)]
    assert header.count(b'"target_sparsity":"0.5"') == 1
    path.write_bytes(raw[:8] + header.replace(b'"target_sparsity":"0.5"', b'"target_sparsity":"0.7"')
                     + raw[tensor_bytes_start(path):])
    with pytest.raises(DamagedFileError, match="checksum does not match"):
        load_thresholds(path)


def test_a_file_without_a_checksum_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"layers.0.act": torch.zeros(())}, path, metadata={"format": "actsparse.thresholds/1"})
    with pytest.raises(DamagedFileError, match=f"{path} is damaged: its header is unreadable or has no checksum"):
        load_thresholds(path)
    assert json.loads(path.read_bytes()[8 : tensor_bytes_start(path)])["__metadata__"] == {"format": "actsparse.thresholds/1"}
