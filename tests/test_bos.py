"""One BOS for every stage: on a model whose config and tokenizer name different BOS tokens,
calibration (collection) and evaluation (perplexity, tasks) start their inputs with the same
token, the tokenizer's (models.bos_id)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from actsparse import corpora, models, stages, tasks

TOKENIZER_BOS = 256  # the byte tokenizer's <s>
CONFIG_BOS = 3  # what the edited model config claims


@pytest.fixture
def disagreeing_model(tiny_model_dir, tmp_path):
    """An imported tiny model whose config says BOS is 3 and whose tokenizer says 256 (and adds it)."""
    model_dir = tmp_path / "disagreeing"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(bos_token_id=CONFIG_BOS, eos_token_id=CONFIG_BOS + 1)
    (model_dir / "config.json").write_text(json.dumps(config))
    tokenizer = models.load_tokenizer(model_dir)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", TOKENIZER_BOS)]
    )
    tokenizer.save_pretrained(model_dir)
    return model_dir


@pytest.fixture
def first_tokens(monkeypatch):
    """The first input token of every forward pass of every model the stages load."""
    seen: list[int] = []
    load_model = models.load_model

    def recording(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        model.base_model.register_forward_pre_hook(  # collection runs the base model alone
            lambda module, args, kw: seen.extend(kw["input_ids"][:, 0].tolist()), with_kwargs=True
        )
        return model, tokenizer

    monkeypatch.setattr(models, "load_model", recording)
    return seen


def test_every_stage_starts_its_inputs_with_the_tokenizers_bos(disagreeing_model, first_tokens, tmp_path):
    tokenizer = models.load_tokenizer(disagreeing_model)
    assert models.AutoConfig.from_pretrained(disagreeing_model).bos_token_id == CONFIG_BOS
    assert models.bos_id(tokenizer) == TOKENIZER_BOS

    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(0))
    corpus = tmp_path / "corpus.safetensors"
    corpora.save_corpus(corpus, {"input_ids": ids, "words": 10, "characters": 96}, {})
    stages.collect_activations(disagreeing_model, corpus, tmp_path / "shard-0.zarr", 0, 1, ["act"], 16, 2,
                               "float16", "fast", "float32", "cpu", {})
    assert set(first_tokens) == {TOKENIZER_BOS}
    first_tokens.clear()
    stages.eval_perplexity(disagreeing_model, corpus, tmp_path / "ppl.json", "dense", 0.0, [], 32, None, 2,
                           "all", "float32", "cpu", {})
    assert set(first_tokens) == {TOKENIZER_BOS}
    # tasks prepend BOS only when the tokenizer adds one (harness parity); when they do, the same id
    assert tasks.bos_prefix(tokenizer) == [TOKENIZER_BOS]
