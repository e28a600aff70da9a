import pytest
import torch

from actsparse.anatomy import (
    UnsupportedArchitectureError,
    anatomy_for,
    anatomy_of,
    decoder_layers,
    model_summary,
)
from actsparse.models import tiny_model
from conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_anatomy_finds_every_ffn_and_attention_part(family):
    model = tiny_model(family)
    anatomy = anatomy_of(model)
    layers = decoder_layers(model, anatomy)
    assert len(layers) == model.config.num_hidden_layers
    for layer in layers:
        for path in anatomy.ffn_projections + anatomy.attention_projections:
            assert isinstance(layer.get_submodule(path), torch.nn.Linear), path
        assert isinstance(layer.get_submodule(anatomy.act), torch.nn.Module)
    # each layer owns its activation module, so per-layer hooks never fire for other layers
    acts = {id(layer.get_submodule(anatomy.act)) for layer in layers}
    assert len(acts) == len(layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_ffn_parameter_count_matches_linear_shapes(family):
    model = tiny_model(family)
    config = model.config
    hidden = config.hidden_size
    ffn = getattr(config, "intermediate_size", None) or config.ffn_dim
    matrices = 3 if anatomy_of(model).gated else 2
    summary = model_summary(model)
    biases = summary["ffn_parameters"] - matrices * hidden * ffn * config.num_hidden_layers
    # non-gated families carry biases on fc1 (ffn) and fc2 (hidden)
    assert biases in (0, (ffn + hidden) * config.num_hidden_layers)
    assert 0 < summary["ffn_share"] < 1
    assert summary["layers"] == config.num_hidden_layers


def test_gated_flags():
    assert anatomy_for("llama").gated and anatomy_for("phi3").gated and anatomy_for("gemma3_text").gated
    assert not anatomy_for("opt").gated and not anatomy_for("phi").gated
    assert "up" not in anatomy_for("opt").components


def test_unknown_architecture_lists_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="supported model types: .*llama.*opt"):
        anatomy_for("mamba")
