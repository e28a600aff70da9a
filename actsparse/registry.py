"""The sparsification methods: the one place that names them and says what each needs and does.

A ``MethodSpec`` declares a method's parameters (JSON-schema types, defaults), the components it
collects and masks, how it scores a value before taking percentiles (``score``), which masked
components get per-channel thresholds, and which projections its thresholds let the decode
kernels skip. The config check builds each method entry's schema from here, the workflow rules
read requirements from here, and ``actsparse.methods`` attaches the fit of each ``score``; so a
new method is one entry (plus a fit, when its score is new).

A config entry is named by its method, or names one with ``method:`` so one method can appear
twice (``teal-greedy: {method: teal, allocation: greedy}``).

Imports nothing heavy: the workflow imports this at every parse.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from actsparse.components import COMPONENTS

QUANTILE_MODES = ("exact", "per_sample")
ALLOCATIONS = ("uniform", "greedy")
SCORES = ("magnitude", "up_mean", "column_norm")  # |v|; CHESS's |a| * mean|up_c|; WINA's |x_i| * ||W[:, i]||


@dataclass(frozen=True)
class Param:
    """One parameter: its JSON schema (with its default and description); ``workflow`` names the
    config key the workflow fills it from (never set under methods)."""

    name: str
    schema: Mapping[str, Any]
    workflow: str | None = None


@dataclass(frozen=True)
class MethodSpec:
    about: str
    masks: tuple[str, ...]  # components it zeroes (layer: the default of params["components"])
    score: str = "magnitude"
    reads: tuple[str, ...] = ()  # components collected only to fit (chess: up, for m_c)
    kv_dense: bool = False  # attn_in masks q alone
    per_channel: tuple[str, ...] = ()  # masked components whose thresholds are per-channel vectors
    skips: tuple[str, ...] = ()  # projections the decode kernels skip work of; () = no decode path
    params: tuple[Param, ...] = ()


ALLOCATION = Param("allocation", {
    "enum": list(ALLOCATIONS), "default": "uniform",
    "description": "uniform: one sparsity for every masked component; greedy: TEAL's block-wise greedy search",
})
_COMPONENTS = Param("components", {
    "type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": list(COMPONENTS)},
    "description": "the components to threshold",
})
_QUANTILE_MODE = Param("quantile_mode", {
    "enum": list(QUANTILE_MODES), "default": "exact",
    "description": "global quantile, or CHESS's per-sample average",
})
_SEQ_LEN = Param("seq_len", {"type": "integer", "minimum": 1}, workflow="collection.seq_len")
_CHESS = (_QUANTILE_MODE, _SEQ_LEN)
_TEAL_MASKS = ("ffn_in", "h", "attn_in", "o_in")
_ALL_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
_ACT_SKIPS = ("up", "down")  # a zero in act skips an up_proj row and a down_proj column

METHODS: dict[str, MethodSpec] = {
    "layer": MethodSpec("Dhar et al.: P_s(|v|) per layer and component", masks=("gate", "up", "h"),
                        params=(_COMPONENTS,)),
    "cats": MethodSpec("CATS: P_s(|act|) per layer", masks=("act",), skips=_ACT_SKIPS),
    "chess": MethodSpec("CHESS: channel-wise on act, |a| * mean|up_c|", masks=("act",), score="up_mean",
                        reads=("up",), per_channel=("act",), skips=_ACT_SKIPS, params=_CHESS),
    "chess+": MethodSpec("CHESS+: chess plus P_s on the q and o inputs, k and v dense",
                         masks=("act", "attn_in", "o_in"), score="up_mean", reads=("up",), kv_dense=True,
                         per_channel=("act",), skips=("q", "o", *_ACT_SKIPS), params=_CHESS),
    "teal": MethodSpec("TEAL: P_s(|x|) on the inputs of all seven projections", masks=_TEAL_MASKS,
                       skips=_ALL_PROJECTIONS),
    "wina": MethodSpec("WINA: P_s(|x_i| * ||W[:, i]||_2) on the inputs of TEAL's projections", masks=_TEAL_MASKS,
                       score="column_norm", per_channel=_TEAL_MASKS, skips=_ALL_PROJECTIONS),
}


def params_of(spec: MethodSpec) -> tuple[Param, ...]:
    """Every parameter a method takes: its own, then those every method takes."""
    return spec.params + (ALLOCATION,)


@dataclass(frozen=True)
class Requirements:
    """What a method needs from collection and gives the sparsifier, for one model."""

    collect: tuple[str, ...]  # components to capture into the calibration stores
    masks: tuple[str, ...]  # components its thresholds zero (the keys of the fitted thresholds)
    kv_dense: bool  # pass to hooks.apply_thresholds


@dataclass(frozen=True)
class Options:
    """A method's parameters, validated, defaults filled in."""

    method: str
    masks: tuple[str, ...]
    gated: bool
    quantile_mode: str = "exact"
    seq_len: int | None = None
    allocation: str = "uniform"
    # score column_norm: per (layer, component) the norms of the columns of the weights it feeds
    column_norms: Mapping[tuple[int, str], Any] | None = None


def method_named(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}") from None


def methods_taking(param: str) -> list[str]:
    return [name for name, spec in METHODS.items() if any(p.name == param for p in params_of(spec))]


def _masks(name: str, spec: MethodSpec, components: Iterable[str] | None, gated: bool) -> tuple[str, ...]:
    if components is None:
        return tuple(c for c in spec.masks if gated or c != "up")
    components = tuple(components)
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise ValueError(f"method {name!r}: components must be some of {list(COMPONENTS)}, got {list(components)}")
    if not gated and "up" in components:
        raise ValueError(f"method {name!r}: a non-gated FFN has no 'up' component")
    return components


def _checked_enum(param: Param, value: Any) -> Any:
    allowed = param.schema["enum"]
    if value not in allowed:
        raise ValueError(f"{param.name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def options(name: str, params: Mapping[str, Any] | None, gated: bool = True) -> Options:
    """A method's parameters checked against its entry; a ValueError names what is wrong."""
    spec = method_named(name)
    params = dict(params or {})
    taken = {p.name: p for p in params_of(spec)}
    unknown = sorted(set(params) - set(taken))
    if unknown:
        raise ValueError(f"method {name!r} takes no params {unknown}; it takes {list(taken)}")
    values = {p.name: _checked_enum(p, params.get(p.name, p.schema["default"]))
              for p in taken.values() if "enum" in p.schema}
    seq_len = params.get("seq_len")
    if values.get("quantile_mode") == "per_sample" and (
        isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1
    ):
        raise ValueError(f"quantile_mode 'per_sample' needs seq_len, a positive int, got {seq_len!r}")
    masks = _masks(name, spec, params.get("components"), gated)
    return Options(name, masks, gated, seq_len=seq_len, **values)


def requirements(method: str, params: Mapping[str, Any] | None = None, *, gated: bool = True) -> Requirements:
    """Which components to collect and mask, and whether k/v stay dense, for a model."""
    opts = options(method, params, gated)
    spec = method_named(method)
    reads = tuple(c for c in spec.reads if gated and c not in opts.masks)
    return Requirements(collect=opts.masks + reads, masks=opts.masks, kv_dense=spec.kv_dense)


# ---------------------------------------------------------------- the workflow config's view


def method_of(name: str, entry: Mapping[str, Any]) -> str:
    """The registry method of config entry ``name``: its ``method:``, else its name."""
    return entry.get("method", name)


def entry_schema(method: str) -> dict[str, Any]:
    """JSON schema of a config entry of ``method``: the parameters a config may set, and ``method``."""
    settable = {p.name: dict(p.schema) for p in params_of(METHODS[method]) if p.workflow is None}
    chooser = {"const": method, "description": "the method this entry configures (default: the entry's name)"}
    return {"type": "object", "additionalProperties": False, "properties": {"method": chooser, **settable}}


def configured(name: str, config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(registry method, fit parameters) of config entry ``name``: its parameters without
    ``method:``, plus those the workflow fills in from other config keys."""
    entry = dict(config["methods"][name])
    method = method_of(name, entry)
    entry.pop("method", None)
    for param in params_of(METHODS[method]):
        if param.workflow:
            section, key = param.workflow.split(".")
            entry[param.name] = config[section][key]
    return method, entry


def decodable(config: Mapping[str, Any]) -> list[str]:
    """The configured entries whose method has a decode path."""
    return [name for name, entry in config["methods"].items() if METHODS[method_of(name, entry)].skips]
