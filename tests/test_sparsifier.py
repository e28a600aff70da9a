import pytest
import torch

from actsparse import hooks, sparsifier
from actsparse.anatomy import anatomy_of, decoder_layers
from actsparse.models import tiny_model

IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))


def captured(model, component):
    values = {}
    with hooks.capture(model, [component], lambda layer, comp, v: values.setdefault(layer, v.clone())):
        with torch.no_grad():
            model(IDS)
    return values


def median_thresholds(model, component):
    return {(layer, component): v.abs().float().median() for layer, v in captured(model, component).items()}


@pytest.mark.parametrize("family", ["llama", "phi3", "opt"])
def test_zero_thresholds_change_nothing_and_removal_restores_dense(family):
    model = tiny_model(family)
    with torch.no_grad():
        dense = model(IDS).logits
        zeros = {(layer, "act"): torch.tensor(0.0) for layer in range(model.config.num_hidden_layers)}
        with sparsifier.sparsified(model, zeros) as measured:
            assert torch.equal(model(IDS).logits, dense)
        with sparsifier.sparsified(model, median_thresholds(model, "act")):
            assert not torch.equal(model(IDS).logits, dense)
        assert torch.equal(model(IDS).logits, dense)
    natural = hooks.ZeroCounter()
    with hooks.capture(model, ["act"], natural), torch.no_grad():
        model(IDS)
    counts = natural.counts().values()
    assert sparsifier.achieved_sparsity(measured) == sum(z for z, _ in counts) / sum(n for _, n in counts)


@pytest.mark.parametrize("family", ["llama", "gemma", "phi3"])
def test_cats_at_the_median_skips_two_thirds_of_half_the_ffn(family):
    """In a gated FFN a zero in act skips one row of up and one column of down: 2 of 3 matrices."""
    model = tiny_model(family)
    with sparsifier.sparsified(model, median_thresholds(model, "act")) as measured, torch.no_grad():
        model(IDS)
    achieved = sparsifier.achieved_sparsity(measured)
    assert achieved == pytest.approx(0.5, abs=0.01)
    assert sparsifier.skipped_ffn_fraction(model, measured) == pytest.approx(2 / 3 * achieved, rel=1e-6)
    per_layer = sparsifier.layer_sparsity(measured)
    assert set(per_layer) == {f"layers.{i}.act" for i in range(model.config.num_hidden_layers)}


def test_ffn_input_sparsity_skips_gate_and_up_columns():
    """TEAL-style: zeros in the FFN input skip columns of gate and up; zeros in h, of down."""
    model = tiny_model("llama")
    thresholds = median_thresholds(model, "ffn_in") | median_thresholds(model, "h")
    with sparsifier.sparsified(model, thresholds) as measured, torch.no_grad():
        model(IDS)
    observed = measured.observed.sparsity()
    anatomy = anatomy_of(model)
    skipped = total = 0
    for i, layer in enumerate(decoder_layers(model)):
        for path, share in ((anatomy.gate, observed[i, "ffn_in"]), (anatomy.up, max(observed[i, "ffn_in"], observed[i, "act"])), (anatomy.down, observed[i, "h"])):
            n = layer.get_submodule(path).weight.numel()
            skipped += n * share
            total += n
    assert sparsifier.skipped_ffn_fraction(model, measured) == pytest.approx(skipped / total)
    assert 0.45 < sparsifier.skipped_ffn_fraction(model, measured) < 0.55
