"""Where the FFN parts and attention inputs live in each supported architecture.

Every stage that hooks, masks or counts parameters goes through this one table, so adding an
architecture touches this file alone.

Logical components (the names used in stores, threshold files and tables):

* ``ffn_in``  input of the FFN (shared by gate and up, or by fc1)
* ``gate``    pre-activation: gate_proj output, or fc1 output for non-gated FFNs
* ``act``     activation output ``act(gate)``
* ``up``      up_proj output (gated FFNs only)
* ``h``       input of down_proj / fc2 (``act * up``, or ``act`` for non-gated FFNs)
* ``down``    output of down_proj / fc2
* ``attn_in`` input of the q/k/v projections
* ``o_in``    input of the attention output projection
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from actsparse.components import ATTENTION_COMPONENTS, COMPONENTS, FFN_COMPONENTS  # noqa: F401 (re-exported)


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class Anatomy:
    """Module paths of one architecture; FFN and attention paths are relative to a decoder layer."""

    family: str
    layers: str
    up: str | None
    down: str
    act: str
    gate: str | None = None
    gate_up: str | None = None  # fused [gate, up] projection, split in half along the last dim
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # fused q/k/v projection
    o: str = "self_attn.o_proj"
    # its decoder layer is the Llama layer actsparse.compiled_step implements in C (RMSNorm, rotate_half
    # rotary, grouped-query attention, a SiLU-gated FFN): decode_speed then also times that step
    compiled_step: bool = False

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.gate_up is not None

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if self.gated or c != "up")

    @property
    def ffn_projections(self) -> tuple[str, ...]:
        return tuple(p for p in (self.gate, self.up, self.gate_up, self.down) if p)

    @property
    def attention_projections(self) -> tuple[str, ...]:
        return tuple(p for p in (self.q, self.k, self.v, self.qkv, self.o) if p)


_LLAMA_LIKE = dict(
    layers="model.layers",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
    act="mlp.act_fn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
)

# model_type (from the model's config.json) -> anatomy
ANATOMIES: dict[str, Anatomy] = {
    "llama": Anatomy(family="llama", **_LLAMA_LIKE, compiled_step=True),
    "mistral": Anatomy(family="mistral", **_LLAMA_LIKE),
    "qwen2": Anatomy(family="qwen2", **_LLAMA_LIKE, compiled_step=True),  # Llama's paths; q/k/v carry biases
    "gemma": Anatomy(family="gemma", **_LLAMA_LIKE),
    "gemma2": Anatomy(family="gemma", **_LLAMA_LIKE),
    "gemma3_text": Anatomy(family="gemma", **_LLAMA_LIKE),
    "phi3": Anatomy(
        family="phi3",
        layers="model.layers",
        gate_up="mlp.gate_up_proj",
        up=None,
        down="mlp.down_proj",
        act="mlp.activation_fn",
        qkv="self_attn.qkv_proj",
    ),
    "phi": Anatomy(
        family="phi",
        layers="model.layers",
        up="mlp.fc1",
        down="mlp.fc2",
        act="mlp.activation_fn",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.dense",
    ),
    "opt": Anatomy(
        family="opt",
        layers="model.decoder.layers",
        up="fc1",
        down="fc2",
        act="activation_fn",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
    ),
}


def anatomy_for(model_type: str) -> Anatomy:
    try:
        return ANATOMIES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ANATOMIES))
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; supported model types: {supported}"
        ) from None


def anatomy_of(model: nn.Module) -> Anatomy:
    return anatomy_for(model.config.model_type)


def decoder_layers(model: nn.Module, anatomy: Anatomy | None = None) -> nn.ModuleList:
    anatomy = anatomy or anatomy_of(model)
    return model.get_submodule(anatomy.layers)


def activation_name(config) -> str:
    """The FFN activation function's name as the config spells it."""
    for key in ("hidden_activation", "hidden_act", "activation_function"):
        value = getattr(config, key, None)
        if value:
            return value
    raise UnsupportedArchitectureError(f"{config.model_type}: config names no FFN activation")


def ffn_parameter_count(model: nn.Module) -> int:
    """Parameters of all FFN projections (weights and biases) over all layers."""
    anatomy = anatomy_of(model)
    return sum(
        p.numel()
        for layer in decoder_layers(model, anatomy)
        for path in anatomy.ffn_projections
        for p in layer.get_submodule(path).parameters()
    )


def model_summary(model: nn.Module) -> dict:
    """The facts of the seed paper's Table I for one model."""
    anatomy = anatomy_of(model)
    total = sum(p.numel() for p in model.parameters())
    ffn = ffn_parameter_count(model)
    return {
        "family": anatomy.family,
        "activation": activation_name(model.config),
        "gated": anatomy.gated,
        "parameters": total,
        "layers": len(decoder_layers(model, anatomy)),
        "ffn_parameters": ffn,
        "ffn_share": ffn / total,
    }
