"""Text corpora for calibration and evaluation, from vendored files or hub datasets.

Both kinds of source go through ``datasets.load_dataset`` and end as one string: the rows of
the text column joined as they are. For WikiText-2 raw, whose rows keep their line breaks, that
string is byte-identical to the raw file, whichever source it came from.

A prepared corpus stores the token ids of a prefix of that text (at most ``max_tokens``) and
the number of whitespace-separated words in exactly the text those tokens cover, so word-level
perplexity stays exact when the corpus is cut short.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from actsparse.provenance import verify_safetensors, write_safetensors


class CorpusError(ValueError):
    pass


def load_text(spec: dict, root: Path = Path(".")) -> str:
    """The corpus text of a config entry: ``{path: ...}`` (vendored, may be .gz/.bz2) or
    ``{hub: <dataset id>, name: <config>, split: <split>, field: text}``."""
    import datasets

    field = spec.get("field", "text")
    if "path" in spec:
        path = Path(root) / spec["path"]
        if not path.is_file():
            raise CorpusError(f"corpus file not found: {path}")
        try:
            rows = datasets.load_dataset("text", data_files=str(path), split="train", keep_linebreaks=True)
        except datasets.exceptions.DatasetGenerationError as error:
            raise CorpusError(f"corpus file {path} cannot be read ({error.__cause__}); replace it") from error
    elif "hub" in spec:
        rows = datasets.load_dataset(spec["hub"], spec.get("name"), split=spec.get("split", "test"))
    else:
        raise CorpusError(f"a corpus needs 'path' or 'hub', got keys {sorted(spec)}")
    if field not in rows.column_names:
        raise CorpusError(f"corpus has no column {field!r}; columns: {rows.column_names}")
    return "".join(rows[field])


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity."""
    return len(re.split(r"\s+", text))


def tokenize(text: str, tokenizer, max_tokens: int | None = None) -> dict:
    """Token ids (no special tokens) of a prefix of ``text`` and the word count of that prefix."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
    if not ids:
        raise CorpusError("corpus is empty after tokenisation")
    covered = text[: encoded["offset_mapping"][len(ids) - 1][1]]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.int32),
        "words": count_words(covered),
        "characters": len(covered),
    }


def save_corpus(path: Path, corpus: dict, metadata: dict) -> None:
    meta = {"words": str(corpus["words"]), "characters": str(corpus["characters"]), "metadata": json.dumps(metadata)}
    write_safetensors(path, save({"input_ids": corpus["input_ids"]}, metadata=meta))


def load_corpus(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"prepared corpus not found: {path}")
    verify_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        return {
            "input_ids": f.get_tensor("input_ids").long(),
            "words": int(meta["words"]),
            "characters": int(meta["characters"]),
            "metadata": json.loads(meta["metadata"]),
        }
