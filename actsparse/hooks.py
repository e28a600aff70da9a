"""Forward hooks that capture, threshold and count FFN/attention activations of decoder layers.

Every location comes from ``actsparse.anatomy``, so the same code serves every supported family,
and weights are never copied or modified: values are read or replaced while they flow between
modules.

Where a component's value is taken, per decoder layer:

* output components (``gate``, ``act``, ``up``, ``down``): a forward hook on the producing module;
  Phi-3's ``gate`` and ``up`` are the two halves of the fused ``gate_up_proj`` output.
* input components (``ffn_in``, ``h``, ``attn_in``, ``o_in``): a forward pre-hook on the consuming
  module. ``ffn_in`` feeds gate and up (or fc1), ``attn_in`` feeds q, k and v (or the fused qkv);
  masking hooks every consumer with the same threshold, capture and counting read the first one.

Every tensor handed to a sink is ``[batch, seq, channels]``: OPT flattens its FFN to
``[batch * seq, channels]``, so the hooks view it back with the shape of the layer's input.

Masking zeroes ``v`` where ``|v| < t``; ``t`` is a scalar or a per-channel vector, compared in the
model's dtype. ``t = 0`` changes nothing, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from actsparse.anatomy import Anatomy, anatomy_of, decoder_layers
from actsparse.components import INPUT_COMPONENTS

Key = tuple[int, str]  # (layer index, component)
Sink = Callable[[int, str, torch.Tensor], None]
TokenMask = Callable[[int], torch.Tensor]  # seq_len -> bool [seq_len], True = sparsify that position



class Hooks:
    """The hooks one call attached; ``remove()`` (or leaving the ``with`` block) detaches all."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass(frozen=True)
class HookSite:
    """One hook point of a component: a module (relative to the layer) and which side of it."""

    path: str
    is_input: bool
    half: int | None = None  # 0 = gate, 1 = up half of a fused gate_up output


def hook_sites(anatomy: Anatomy, component: str, kv_dense: bool = False) -> list[HookSite]:
    """Hook points of a component; for input components, one per consuming module."""
    a = anatomy
    if component == "ffn_in":
        return [HookSite(p, True) for p in (a.gate, a.up, a.gate_up) if p]
    if component == "attn_in":
        if kv_dense and a.q is None:
            raise ValueError(f"{a.family}: q, k and v share {a.qkv}; a pre-hook cannot keep k and v dense")
        return [HookSite(p, True) for p in ((a.q,) if kv_dense else (a.q, a.k, a.v, a.qkv)) if p]
    if component in ("h", "down"):
        return [HookSite(a.down, component == "h")]
    if component == "o_in":
        return [HookSite(a.o, True)]
    if component == "act":
        return [HookSite(a.act, False)]
    if a.gate_up:
        return [HookSite(a.gate_up, False, half=("gate", "up").index(component))]
    # a non-gated FFN keeps fc1 in the ``up`` slot, and its output is the ``gate`` component
    return [HookSite(a.gate or a.up if component == "gate" else a.up, False)]


def input_column_norms(model: nn.Module, components: Iterable[str], kv_dense: bool = False) -> dict[Key, np.ndarray]:
    """Per layer and input component, the L2 norm of each input channel's column over every
    module it feeds (as masking hooks them): ``sqrt(sum over consumers of ||W[:, c]||^2)``, float64."""
    anatomy = anatomy_of(model)
    components = tuple(components)
    bad = sorted(set(components) - set(INPUT_COMPONENTS))
    if bad:
        raise ValueError(f"column norms exist for the inputs {list(INPUT_COMPONENTS)}, not {bad}")
    norms = {}
    for index, layer in enumerate(decoder_layers(model, anatomy)):
        for component in components:
            squares = sum(layer.get_submodule(site.path).weight.detach().double().square().sum(dim=0)
                          for site in hook_sites(anatomy, component, kv_dense))
            norms[index, component] = squares.sqrt().cpu().numpy()
    return norms


def _check_components(anatomy: Anatomy, components: Iterable[str]) -> None:
    unknown = sorted(set(components) - set(anatomy.components))
    if unknown:
        raise ValueError(f"{anatomy.family} has no component {unknown}; it has {list(anatomy.components)}")


def _layer_indices(n_layers: int, layers: Iterable[int] | None) -> list[int]:
    indices = list(range(n_layers)) if layers is None else sorted(set(layers))
    bad = [i for i in indices if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range; the model has {n_layers} decoder layers")
    return indices


class _LayerShapes:
    """(batch, seq) of each decoder layer's current input, to undo OPT's flattening of its FFN."""

    def __init__(self) -> None:
        self._by_layer: dict[int, torch.Size] = {}

    def attach(self, layer: nn.Module, index: int) -> RemovableHandle:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._by_layer[index] = hidden.shape[:2]

        return layer.register_forward_pre_hook(record, with_kwargs=True)

    def as_3d(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.dim() == 3 else tensor.view(*self._by_layer[index], -1)


Transform = Callable[[torch.Tensor], torch.Tensor | None]  # [b, s, c] -> replacement, or None to keep


def _hook(layer: nn.Module, index: int, site: HookSite, shapes: _LayerShapes, fn: Transform) -> RemovableHandle:
    """Run ``fn`` on the site's value as [b, s, c] and put its result (if any) back in place."""
    module = layer.get_submodule(site.path)
    if site.is_input:

        def pre(module: nn.Module, args: tuple) -> tuple | None:
            new = fn(shapes.as_3d(index, args[0]))
            return None if new is None else (new.view_as(args[0]), *args[1:])

        return module.register_forward_pre_hook(pre)

    def post(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        new = fn(shapes.as_3d(index, out))
        return None if new is None else new.view_as(out)

    return module.register_forward_hook(post)


def _part(value: torch.Tensor, half: int | None) -> torch.Tensor:
    return value if half is None else value.chunk(2, dim=-1)[half]


def capture(
    model: nn.Module, components: Iterable[str], sink: Sink, layers: Iterable[int] | None = None
) -> Hooks:
    """Call ``sink(layer, component, value)`` with each detached [b, s, c] value a forward produces.

    Values are not copied (the model makes fresh ones each forward, so keeping them is safe).
    Attached after ``apply_thresholds``, it sees the masked values. A ``ZeroCounter`` is a sink.
    """
    anatomy = anatomy_of(model)
    components = tuple(components)
    _check_components(anatomy, components)
    all_layers = decoder_layers(model, anatomy)
    shapes = _LayerShapes()
    handles = []
    for index in _layer_indices(len(all_layers), layers):
        layer = all_layers[index]
        handles.append(shapes.attach(layer, index))
        for component in components:
            site = hook_sites(anatomy, component)[0]

            def read(value: torch.Tensor, index=index, component=component, half=site.half) -> None:
                sink(index, component, _part(value, half).detach())

            handles.append(_hook(layer, index, site, shapes, read))
    return Hooks(handles)


class ZeroCounter:
    """Exact zeros and elements seen per (layer, component), summed on device.

    As a ``capture`` sink it measures natural sparsity; passed to ``apply_thresholds`` it measures
    the sparsity achieved on the sparsified positions. Each value costs one reduction and no
    host sync; ``counts()`` / ``sparsity()`` sync once.
    """

    def __init__(self) -> None:
        self._zeros: dict[Key, torch.Tensor] = {}
        self._seen: dict[Key, int] = {}

    def __call__(self, layer: int, component: str, value: torch.Tensor) -> None:
        self.add((layer, component), value == 0, value.numel())

    def add(self, key: Key, zero_flags: torch.Tensor, seen: int) -> None:
        """Count the True entries of ``zero_flags`` as zeros among ``seen`` elements."""
        zeros = zero_flags.sum()
        self._zeros[key] = self._zeros[key] + zeros if key in self._zeros else zeros
        self._seen[key] = self._seen.get(key, 0) + seen

    def counts(self) -> dict[Key, tuple[int, int]]:
        """(zeros, elements seen) per key, for callers that pool keys or runs."""
        if not self._zeros:
            return {}
        device = next(iter(self._zeros.values())).device
        zeros = torch.stack([z.to(device) for z in self._zeros.values()]).tolist()
        return {key: (z, self._seen[key]) for key, z in zip(self._zeros, zeros)}

    def sparsity(self) -> dict[Key, float]:
        return {key: zeros / seen for key, (zeros, seen) in self.counts().items()}


def last_fraction(fraction: float) -> TokenMask:
    """TEAL's evaluation setting: sparsify only the last ``fraction`` of the positions.

    Rounded up, so a decoding step (one position) is sparsified and a prompt of n positions keeps
    its first ``n - ceil(fraction * n)`` dense.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"last_fraction needs 0 < fraction <= 1, got {fraction}")

    def mask(seq_len: int) -> torch.Tensor:
        dense = seq_len - math.ceil(round(fraction * seq_len, 6))
        return torch.arange(seq_len) >= dense

    return mask


class _TokenSelection:
    """A ``TokenMask`` evaluated once per (seq_len, device) and kept there, so a forward pays no copy."""

    def __init__(self, token_mask: TokenMask) -> None:
        self._token_mask = token_mask
        self._cache: dict[tuple[int, torch.device], tuple[torch.Tensor, int]] = {}

    def get(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """Selection shaped [seq, 1] (broadcasts over channels) and how many positions it selects."""
        key = (seq_len, device)
        if key not in self._cache:
            selected = torch.as_tensor(self._token_mask(seq_len))
            if selected.dtype != torch.bool or selected.shape != (seq_len,):
                raise ValueError(
                    f"token_mask({seq_len}) must return a bool tensor of shape ({seq_len},), "
                    f"got {selected.dtype} {tuple(selected.shape)}"
                )
            self._cache[key] = (selected.to(device)[:, None], int(selected.sum()))
        return self._cache[key]


class _Masker:
    """Thresholds one hook site of one layer; counts the result for the components it owns."""

    def __init__(
        self,
        layer: int,
        threshold: torch.Tensor,
        tokens: _TokenSelection | None,
        counted: list[tuple[str, int | None]],
        counter: ZeroCounter | None,
    ) -> None:
        self.layer = layer
        self.threshold = threshold
        self.tokens = tokens
        self.counted = counted if counter else []
        self.counter = counter

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        drop = value.abs() < self.threshold
        if self.tokens is None:
            selected, n_selected = None, value.shape[1]
        else:
            selected, n_selected = self.tokens.get(value.shape[1], value.device)
            drop &= selected
        masked = value.masked_fill(drop, 0)
        for component, half in self.counted:
            part = _part(masked, half)
            zeros = part == 0 if selected is None else (part == 0) & selected
            self.counter.add((self.layer, component), zeros, part.shape[0] * n_selected * part.shape[-1])
        return masked


def _channels(layer: nn.Module, anatomy: Anatomy, component: str) -> int:
    if component in INPUT_COMPONENTS:
        return layer.get_submodule(hook_sites(anatomy, component)[0].path).in_features
    down = layer.get_submodule(anatomy.down)
    return down.out_features if component == "down" else down.in_features


def _threshold(value: torch.Tensor | float, channels: int, key: Key, like: torch.Tensor) -> torch.Tensor:
    """Validate a threshold and move it to the layer's device and dtype, once."""
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() > 1 or (t.dim() == 1 and t.numel() != channels):
        raise ValueError(f"threshold for {key} must be a scalar or a vector of {channels}, got {tuple(t.shape)}")
    if t.isnan().any() or (t < 0).any():
        raise ValueError(f"threshold for {key} must be >= 0 (no NaN)")
    return t.to(device=like.device, dtype=like.dtype)


def _fused(parts: dict[int, torch.Tensor], channels: int, like: torch.Tensor) -> torch.Tensor:
    """One threshold over a fused [gate | up] output; an unthresholded half gets 0 (kept as is)."""
    zeros = torch.zeros(channels, device=like.device, dtype=like.dtype)
    return torch.cat([parts[h].expand(channels) if h in parts else zeros for h in (0, 1)])


@dataclass
class _SitePlan:
    """What one hooked module side of one layer masks: threshold per fused half (None = whole
    value) and the components whose zeros are counted there."""

    thresholds: dict[int | None, torch.Tensor] = field(default_factory=dict)
    counted: list[tuple[str, int | None]] = field(default_factory=list)


def _plan(
    model: nn.Module, anatomy: Anatomy, thresholds: Mapping[Key, torch.Tensor | float], kv_dense: bool
) -> dict[tuple[int, HookSite], _SitePlan]:
    """Group validated thresholds by hook site; Phi-3's gate and up land on the same one."""
    all_layers = decoder_layers(model, anatomy)
    _layer_indices(len(all_layers), {layer for layer, _ in thresholds})
    plans: dict[tuple[int, HookSite], _SitePlan] = {}
    for (index, component), value in thresholds.items():
        layer = all_layers[index]
        t = _threshold(value, _channels(layer, anatomy, component), (index, component), next(layer.parameters()))
        for n, site in enumerate(hook_sites(anatomy, component, kv_dense)):
            plan = plans.setdefault((index, HookSite(site.path, site.is_input)), _SitePlan())
            plan.thresholds[site.half] = t
            if n == 0:  # one count per component, however many consumers it feeds
                plan.counted.append((component, site.half))
    return plans


def apply_thresholds(
    model: nn.Module,
    thresholds: Mapping[Key, torch.Tensor | float],
    token_mask: TokenMask | None = None,
    counter: ZeroCounter | None = None,
    kv_dense: bool = False,
) -> Hooks:
    """Zero every value ``v`` with ``|v| < t`` at each thresholded (layer, component).

    ``thresholds[(layer, component)]`` is a scalar or a per-channel vector.
    ``token_mask(seq_len)`` picks the sequence positions to sparsify (e.g. ``last_fraction(0.5)``,
    TEAL's evaluation); default all. ``counter`` counts zeros after masking, on the selected
    positions only. ``kv_dense`` masks ``attn_in`` for q_proj alone (CHESS+ keeps k and v dense).
    """
    anatomy = anatomy_of(model)
    _check_components(anatomy, {component for _, component in thresholds})
    plans = _plan(model, anatomy, thresholds, kv_dense)
    all_layers = decoder_layers(model, anatomy)
    tokens = _TokenSelection(token_mask) if token_mask else None
    shapes = _LayerShapes()
    handles = [shapes.attach(all_layers[i], i) for i in sorted({i for i, _ in plans})]
    for (index, site), plan in plans.items():
        layer = all_layers[index]
        t = plan.thresholds.get(None)
        if t is None:
            t = _fused(plan.thresholds, layer.get_submodule(anatomy.down).in_features, next(layer.parameters()))
        masker = _Masker(index, t, tokens, plan.counted, counter)
        handles.append(_hook(layer, index, site, shapes, masker))
    return Hooks(handles)
