import gzip

import pytest

from actsparse.corpora import CorpusError, count_words, load_corpus, load_text, save_corpus, tokenize
from actsparse.models import byte_tokenizer
from conftest import REPO

WIKI_TEST = "resources/data/wikitext-2-raw/wiki.test.raw.gz"


def test_vendored_text_is_the_raw_file_byte_for_byte():
    text = load_text({"path": WIKI_TEST}, root=REPO)
    with gzip.open(REPO / WIKI_TEST, "rt", encoding="utf-8") as f:
        assert text == f.read()
    # the WikiText paper's count: whitespace words of the test split
    assert len(text.split()) == 241_211


def test_truncated_corpus_counts_the_words_of_exactly_the_covered_text():
    text = "alpha beta  gamma\ndelta epsilon"
    corpus = tokenize(text, byte_tokenizer(), max_tokens=12)  # byte tokens: "alpha beta  "
    assert len(corpus["input_ids"]) == 12
    assert corpus["characters"] == 12
    assert corpus["words"] == count_words("alpha beta  ")


def test_round_trip(tmp_path):
    corpus = tokenize("one two three", byte_tokenizer())
    save_corpus(tmp_path / "c.safetensors", corpus, {"source": "test"})
    loaded = load_corpus(tmp_path / "c.safetensors")
    assert loaded["input_ids"].tolist() == corpus["input_ids"].tolist()
    assert loaded["words"] == 3 and loaded["metadata"] == {"source": "test"}


@pytest.mark.parametrize(
    "spec, message",
    [({"path": "missing.txt"}, "not found"), ({"name": "x"}, "needs 'path' or 'hub'"), ({"path": WIKI_TEST, "field": "body"}, "no column"),
     ({"path": "tests/data/bad_configs/corrupt.txt.gz"}, r"corpus file .*corrupt\.txt\.gz cannot be read \(CRC check failed")],
)
def test_bad_corpus_specs_fail_clearly(spec, message):
    with pytest.raises(CorpusError, match=message):
        load_text(spec, root=REPO)
