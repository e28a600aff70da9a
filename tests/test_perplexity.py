import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from actsparse.models import load_model
from actsparse.perplexity import perplexities, sequence_nll, windows


@given(n=st.integers(1, 300), window=st.integers(2, 64), data=st.data())
def test_windows_score_every_token_exactly_once(n, window, data):
    stride = data.draw(st.one_of(st.none(), st.integers(1, window - 1)))
    spans = windows(n, window, stride)
    scored = [i for w in spans for i in range(w.first_scored, w.end)]
    assert scored == list(range(n))
    for w in spans:
        assert w.end - w.begin <= window - 1  # plus BOS fits the window
        assert w.begin <= w.first_scored < w.end


def test_windows_reject_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        windows(10, 8, stride=8)
    with pytest.raises(ValueError, match="window"):
        windows(10, 1)


def plain_loop_nll(model, tokens, bos, window, stride):
    """Independent reference: one window at a time, one token at a time."""
    context = window - 1
    stride = stride or context
    total, count, position = 0.0, 0, 0
    while position < len(tokens):
        end = min(len(tokens), position + stride)
        begin = max(0, end - context)
        inputs = [bos] + tokens[begin:end]
        with torch.no_grad():
            logits = model(torch.tensor([inputs])).logits[0].double()
        for i in range(position, end):
            at = i - begin + 1  # input position of text token i
            total -= torch.log_softmax(logits[at - 1], dim=-1)[inputs[at]].item()
            count += 1
        position = end
    return total, count


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("window, stride, batch", [(32, None, 1), (32, None, 3), (32, 10, 2), (200, None, 4)])
def test_sequence_nll_matches_plain_loop(tiny_model_dir, family, window, stride, batch):
    """Equal to a float64 loop to 1e-9 (both log-softmax in float64), windows of 200 scoring more
    positions than one float64 block (128) holds."""
    model, _ = load_model(tiny_model_dir(family))
    tokens = torch.randint(0, 256, (297,), generator=torch.Generator().manual_seed(0))
    nll, count = sequence_nll(model, tokens, 256, window, stride, batch)
    ref_nll, ref_count = plain_loop_nll(model, tokens.tolist(), 256, window, stride)
    assert count == ref_count == 297
    assert nll == pytest.approx(ref_nll, rel=1e-9)


def test_perplexities_formula():
    result = perplexities(nll=100.0, tokens=50, words=40)
    assert result["ppl"] == pytest.approx(math.exp(2.0))
    assert result["word_ppl"] == pytest.approx(math.exp(2.5))
