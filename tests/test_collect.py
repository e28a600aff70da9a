"""Collection against plain forward hooks registered here on the modules, and interrupted runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from actsparse.anatomy import Anatomy, anatomy_of, decoder_layers
from actsparse.collect import collect_shard, shard_slices
from actsparse.models import load_model, tiny_model
from actsparse.store import CorpusSlice, StoreError, open_store, partial_path

FAMILIES = ("llama", "mistral", "qwen2", "phi3", "phi", "opt", "gemma")
SUFFIXES = (".zarr", ".h5")
SEQ, BATCH, N_TOKENS = 12, 3, 200  # 16 sequences; 3 shards of 6, 5 and 5 sequences
BOS = 256  # the byte tokenizer's bos_token_id (models.bos_id)
PROVENANCE = {"config_hash": "abc"}


def corpus(n: int = N_TOKENS) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(7), dtype=torch.int32)


@cache
def model(family: str) -> torch.nn.Module:
    return tiny_model(family, seed=3)


def reference_point(anatomy: Anatomy, component: str) -> tuple[str, bool, int | None]:
    """(module path in a layer, True for its input, half of a fused output) where a component is seen."""
    a = anatomy

    def ffn_output(half: int, path: str | None) -> tuple[str, bool, int | None]:
        return (a.gate_up, False, half) if a.gate_up else (path, False, None)

    points = {
        "ffn_in": (a.gate_up or a.gate or a.up, True, None),
        "gate": ffn_output(0, a.gate or a.up),  # a non-gated FFN's fc1 output is its ``gate``
        "up": ffn_output(1, a.up),
        "act": (a.act, False, None),
        "h": (a.down, True, None),
        "down": (a.down, False, None),
        "attn_in": (a.qkv or a.q, True, None),
        "o_in": (a.o, True, None),
    }
    return points[component]


def reference(net: torch.nn.Module, tokens: torch.Tensor, part: CorpusSlice) -> dict[tuple[int, str], torch.Tensor]:
    """Every component of every layer over the shard's text tokens: plain hooks, full forwards of
    ``[BOS] + sequence`` batches, BOS rows dropped, float32."""
    anatomy = anatomy_of(net)
    captured: dict[tuple[int, str], list[torch.Tensor]] = {}
    shape: list[int] = []  # (batch, seq) of the current input, to undo OPT's flattened FFN
    handles = []
    for index, layer in enumerate(decoder_layers(net, anatomy)):
        for component in anatomy.components:
            path, is_input, half = reference_point(anatomy, component)

            def keep(value, key=(index, component), half=half) -> None:
                value = value.reshape(*shape, -1)
                value = value if half is None else value.chunk(2, dim=-1)[half]
                captured.setdefault(key, []).append(value[:, 1:].reshape(-1, value.shape[-1]).clone())

            module = layer.get_submodule(path)
            if is_input:
                handles.append(module.register_forward_pre_hook(lambda m, args, keep=keep: keep(args[0])))
            else:
                handles.append(module.register_forward_hook(lambda m, args, out, keep=keep: keep(out)))
    sequences = tokens[part.token_start : part.token_stop].long().view(-1, SEQ)
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), BATCH):
                batch = sequences[start : start + BATCH]
                shape[:] = [len(batch), SEQ + 1]
                net(input_ids=torch.cat([torch.full((len(batch), 1), BOS), batch], dim=1))
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.cat(parts) for key, parts in captured.items()}


def stored(path: Path) -> dict[tuple[int, str], torch.Tensor]:
    with open_store(path) as store:
        return {key: torch.cat(list(store.iter_chunks(*key))) for key in store.keys()}


def bits(x: torch.Tensor) -> np.ndarray:
    return x.view(torch.int16).numpy()


def collect(net: torch.nn.Module, path: Path, part: CorpusSlice, components=None, dtype="float16") -> None:
    components = components or anatomy_of(net).components
    collect_shard(net, corpus(), part, path, components, SEQ, BATCH, dtype, PROVENANCE, "tiny", BOS)


def test_shard_slices_are_contiguous_whole_sequences_spread_evenly() -> None:
    slices = shard_slices(N_TOKENS, 3, SEQ, corpus="c4")
    assert [(s.token_start, s.token_stop) for s in slices] == [(0, 72), (72, 132), (132, 192)]
    assert [(s.corpus, s.shard_index, s.shard_count) for s in slices] == [("c4", i, 3) for i in range(3)]
    assert shard_slices(N_TOKENS, 1, SEQ)[0].tokens == 192  # the 8-token tail is left out


def test_shard_slices_refuse_fewer_sequences_than_shards() -> None:
    with pytest.raises(ValueError, match="16 sequences of 12, fewer than 17 shards"):
        shard_slices(N_TOKENS, 17, SEQ)


@pytest.mark.parametrize("family", FAMILIES)
def test_store_equals_plain_hooks_bit_for_bit(tmp_path, family) -> None:
    net = model(family)
    part = shard_slices(N_TOKENS, 3, SEQ)[1]  # 5 sequences: batches of 3 and 2
    path = tmp_path / "shard.zarr"
    collect(net, path, part)

    expected = reference(net, corpus(), part)
    values = stored(path)
    assert sorted(values) == sorted(expected)
    for key, x in expected.items():
        assert values[key].shape == (part.tokens, x.shape[-1]) == x.shape, key
        assert np.array_equal(bits(values[key]), bits(x.half())), key
    with open_store(path) as store:
        assert store.tokens == part.tokens and store.corpus == part
        assert store.metadata["provenance"] == PROVENANCE and store.metadata["model"] == "tiny"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_bfloat16_store_from_an_imported_model(tmp_path, tiny_model_dir, suffix) -> None:
    net, _ = load_model(tiny_model_dir("phi3"))
    part = shard_slices(N_TOKENS, 2, SEQ)[0]
    path = tmp_path / f"shard{suffix}"
    collect(net, path, part, components=("gate", "up", "o_in"), dtype=torch.bfloat16)

    expected = reference(net, corpus(), part)
    values = stored(path)
    assert sorted(values) == [(layer, c) for layer in range(3) for c in ("gate", "o_in", "up")]
    for key, x in values.items():
        assert x.dtype == torch.bfloat16
        assert np.array_equal(bits(x), bits(expected[key].bfloat16())), key


class Interrupted(Exception):
    pass


def fail_after(net: torch.nn.Module, batches: int):
    """A forward hook on the last layer that raises once ``batches`` batches have gone through."""
    seen = []

    def hook(module, args, out) -> None:
        seen.append(1)
        if len(seen) > batches:
            raise Interrupted(f"stopped after {batches} batches")

    return decoder_layers(net)[-1].register_forward_hook(hook)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_interrupted_collection_leaves_no_store_and_a_rerun_completes(tmp_path, suffix) -> None:
    net = model("llama")
    part = shard_slices(N_TOKENS, 1, SEQ)[0]  # 16 sequences, 6 batches
    path = tmp_path / f"shard{suffix}"
    components = ("act", "h")
    with fail_after(net, 2), pytest.raises(Interrupted):
        collect(net, path, part, components)
    assert not path.exists() and partial_path(path).exists()
    with pytest.raises(StoreError, match="incomplete"):
        open_store(path)

    collect(net, path, part, components)
    clean = tmp_path / f"clean{suffix}"
    collect(net, clean, part, components)
    assert not partial_path(path).exists()
    first, second = stored(path), stored(clean)
    assert all(np.array_equal(bits(first[k]), bits(second[k])) for k in second)


_KILLED_RUN = """
import os, signal, sys, torch
from actsparse.anatomy import decoder_layers
from actsparse.collect import collect_shard, shard_slices
from actsparse.models import tiny_model
torch.set_num_threads(1)
net = tiny_model("opt", seed=3)
calls = []
def kill(module, args, out):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
decoder_layers(net)[-1].register_forward_hook(kill)
tokens = torch.randint(0, 256, ({n},))
part = shard_slices({n}, 1, {seq})[0]
collect_shard(net, tokens, part, sys.argv[1], ["act", "h"], {seq}, {batch}, "float16", {{}}, "tiny", 256)
"""


@pytest.mark.parametrize("suffix", [".zarr", pytest.param(".h5", marks=pytest.mark.slow)])
def test_killed_process_leaves_no_store_and_a_rerun_completes(tmp_path, suffix) -> None:
    """SIGKILL: no exception handler, no ``finally`` runs; only the rename protects the store."""
    path = tmp_path / f"shard{suffix}"
    script = textwrap.dedent(_KILLED_RUN.format(n=N_TOKENS, seq=SEQ, batch=BATCH))
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    assert not path.exists() and partial_path(path).exists()
    with pytest.raises(StoreError):
        open_store(path)

    part = shard_slices(N_TOKENS, 1, SEQ)[0]
    collect(model("opt"), path, part, components=("act", "h"))
    with open_store(path) as store:
        assert store.tokens == part.tokens and store.shape(2, "h") == (part.tokens, 128)


def test_bad_input_fails_early_with_the_reason(tmp_path) -> None:
    net = model("llama")
    path = tmp_path / "shard.zarr"
    with pytest.raises(ValueError, match="not whole sequences of 12"):
        collect_shard(net, corpus(), CorpusSlice("c", 0, 1, 0, 100), path, ["act"], SEQ, BATCH,
                      "float16", {}, "tiny", BOS)
    with pytest.raises(ValueError, match="the corpus has 200"):
        collect_shard(net, corpus(), CorpusSlice("c", 0, 1, 0, 240), path, ["act"], SEQ, BATCH,
                      "float16", {}, "tiny", BOS)
    with pytest.raises(ValueError, match="stored dtype"):
        collect(net, path, shard_slices(N_TOKENS, 1, SEQ)[0], dtype="float64")
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        collect_shard(net, corpus(1024), shard_slices(1024, 1, 512)[0], path, ["act"], 512, 1,
                      "float16", {}, "tiny", BOS)
    with pytest.raises(ValueError, match="opt has no component"):
        collect(model("opt"), path, shard_slices(N_TOKENS, 1, SEQ)[0], components=("up",))
    assert not path.exists() and not partial_path(path).exists()
