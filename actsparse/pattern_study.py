"""The seed paper's pattern-matching study (Table II, Figs 9-12) and the activity predictor, run
on a real model under a fitted thresholds file.

``patterns`` holds the pure parts (variants, match metrics, predictor, prefetch simulation);
this module feeds them a model and writes the workflow's tables and figures.

*Active neuron*: channel i of a layer is active at a token when the input of down_proj ``h`` is
nonzero there after the thresholds are applied. Those are the channels whose weights (gate and
up rows, down column) a prefetcher must load, whichever component the method thresholds (act
for cats and chess, gate/up/h for layer, every projection input for teal).

Every model input is ``[BOS] + text tokens``, as in perplexity; the BOS position is dropped
from patterns and features, so position t is text token t. Layers are numbered from 0.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from actsparse import corpora, hooks, methods, models, patterns, sparsifier, stages, tables
from actsparse.anatomy import anatomy_of, decoder_layers
from actsparse.columns import LATENCY_KEYS, MATCH_KEYS, PREDICTOR_KEYS, PREFETCH_KEYS, TABLE_II_KEYS
from actsparse.provenance import write_json, write_text

MATCH = ("model", "strategy", "sample", "similarity", "measured_similarity", "layer", "metric", "match_rate")
PREDICTOR = ("model", "features", "source_layer", "target_layer", "precision", "recall", "f1", "active_fraction",
             "train_tokens", "eval_tokens", "predictor_params", "params_fraction", "flops_fraction")
PREFETCH = ("model", "features", "source_layer", "layer", "budget_fraction", "recall", "precision", "bytes_fetched",
            "dense_bytes", "late_bytes")
LATENCY = ("model", "hardware", "features", "budget_fraction", "bandwidth_gbs", "miss_bandwidth_gbs", "compute_gflops",
           "bytes_per_weight", "dense_ms", "oracle_ms", "time_ms", "saving_recovered")
RANKING_METRIC = "paper_match_rate"  # best / worst sample for the heatmaps, as the paper ranks its samples
TILE = (64, 64)  # tokens x neurons: paper_match_rate's window, and the heatmaps show exactly that tile

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Samples and variants


def choose_samples(tokens: Sequence[int], count: int, length: int, seed: int) -> list[tuple[int, list[int]]]:
    """``count`` non-overlapping windows of ``length`` tokens as (start, ids), in corpus order.

    The corpus is cut into consecutive blocks of ``length`` and a seeded draw picks ``count``
    of them, so samples come from all over the corpus and never share a token.
    """
    if count < 1 or length < 1:
        raise ValueError(f"samples and length must be positive, got {count} x {length}")
    blocks = len(tokens) // length
    if blocks < count:
        raise ValueError(
            f"the evaluation corpus has {len(tokens)} tokens, fewer than patterns.samples x patterns.length = "
            f"{count} x {length}; raise corpora.evaluation.max_tokens or lower the samples"
        )
    starts = sorted(int(b) * length for b in np.random.default_rng(seed).choice(blocks, count, replace=False))
    return [(start, [int(i) for i in tokens[start : start + length]]) for start in starts]


@dataclass(frozen=True)
class Edits:
    """One strategy's variants of one sample: the original's token ids and (nominal similarity, ids) per variant."""

    original: list[int]
    variants: list[tuple[float, list[int]]]


class Editor:
    """Token- and word-level variants of samples for one tokenizer (see ``patterns.make_variants``).

    ``token``: edits the sample's ids directly, with random non-special ids below ``vocab_size``.
    ``word``: decodes the sample, replaces whitespace-separated words by distinct words of the
    whole corpus that take as many tokens (with a leading space), keeps the whitespace, and
    tokenises the result. Its original is the re-tokenised decoded sample, so both sides of a
    comparison went through the same tokenisation; equal token counts keep positions aligned
    as far as the tokenizer composes words independently.
    """

    def __init__(self, tokenizer, corpus_ids: Sequence[int], similarities: Sequence[float], vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.similarities = tuple(similarities)
        self.vocab_size = vocab_size
        self.pool = sorted(set(tokenizer.decode(list(corpus_ids)).split()))
        self._token_counts: dict[str, int] = {}
        self._count_tokens(self.pool)

    def edits(self, ids: Sequence[int], strategy: str, rng: np.random.Generator) -> Edits:
        if strategy == "token":
            variants = patterns.make_variants(
                ids, self.similarities, "token", rng,
                vocab_size=self.vocab_size, special_ids=self.tokenizer.all_special_ids,
            )
            return Edits(list(ids), [(v.nominal, v.items) for v in variants])
        text = self.tokenizer.decode(list(ids))
        pieces = re.split(r"(\S+)", text)  # separators at even indices, words at odd ones
        self._count_tokens(pieces[1::2])
        variants = patterns.make_variants(
            pieces[1::2], self.similarities, strategy, rng, word_pool=self.pool, length_key=self._token_counts.get
        )
        return Edits(self._encode(text), [(v.nominal, self._encode(_with_words(pieces, v.items))) for v in variants])

    def _count_tokens(self, words: Sequence[str]) -> None:
        new = sorted({w for w in words if w not in self._token_counts})
        if new:
            encoded = self.tokenizer([" " + w for w in new], add_special_tokens=False)["input_ids"]
            self._token_counts.update((w, len(e)) for w, e in zip(new, encoded))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _with_words(pieces: list[str], words: Sequence[str]) -> str:
    edited = list(pieces)
    edited[1::2] = words
    return "".join(edited)


# ---------------------------------------------------------------------------------------------
# Forward passes


def active_neurons(
    model: torch.nn.Module, ids: Sequence[int], bos: int, layers: Sequence[int] | None = None,
    hidden_layer: int | None = None,
) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
    """Active-neuron patterns (bool ``[len(ids), neurons]``) per layer for one text, and the FFN
    input of ``hidden_layer`` (float32 ``[len(ids), hidden]``) if asked.

    Reads whatever the model computes, so thresholds attached before (``stages.sparsified``)
    shape the patterns. Runs the base model only: the LM head is not needed.
    """
    found = forward_activity(model, ids, bos, layers, () if hidden_layer is None else (hidden_layer,))
    return found.patterns, None if hidden_layer is None else found.ffn_in[hidden_layer]


@dataclass
class Activity:
    """Per-token data of one text (or of consecutive windows of it, concatenated): the active
    patterns of some layers, the FFN inputs of some layers and, if asked, the residual-stream
    input of every decoder layer (``residual[l]``: what layer l reads, the embeddings for l = 0)."""

    patterns: dict[int, np.ndarray]
    ffn_in: dict[int, np.ndarray]
    residual: dict[int, np.ndarray]

    @property
    def tokens(self) -> int:
        return len(next(iter(self.patterns.values())))


def forward_activity(
    model: torch.nn.Module, ids: Sequence[int], bos: int, layers: Sequence[int] | None,
    ffn_in_layers: Sequence[int] = (), residual: bool = False,
) -> Activity:
    """One forward pass of ``[bos] + ids``: patterns of ``layers`` (None: all), FFN inputs of
    ``ffn_in_layers`` and, with ``residual``, every layer's residual-stream input, read from the
    model's own ``output_hidden_states`` (entry l < L is the input of decoder layer l in every
    supported family), so no extra hook is needed. The BOS position is dropped."""
    captured: dict[tuple[int, str], torch.Tensor] = {}

    def sink(layer: int, component: str, value: torch.Tensor) -> None:
        captured[layer, component] = value[0, 1:]

    inputs = torch.tensor([[bos, *ids]], device=model.device)
    with ExitStack() as stack:
        stack.enter_context(hooks.capture(model, ["h"], sink, layers))
        if ffn_in_layers:
            stack.enter_context(hooks.capture(model, ["ffn_in"], sink, ffn_in_layers))
        with torch.inference_mode():
            out = model.base_model(input_ids=inputs, output_hidden_states=residual)
    found = {layer: (value != 0).cpu().numpy() for (layer, component), value in captured.items() if component == "h"}
    streams = {}
    if residual:
        streams = {layer: _host(h[0, 1:]) for layer, h in enumerate(out.hidden_states[: len(decoder_layers(model))])}
    return Activity(dict(sorted(found.items())), {layer: _host(captured[layer, "ffn_in"]) for layer in ffn_in_layers},
                    streams)


def _host(value: torch.Tensor) -> np.ndarray:
    return value.float().cpu().numpy()


def _all_layers(model: torch.nn.Module, ids: Sequence[int], bos: int) -> list[np.ndarray]:
    return list(active_neurons(model, ids, bos)[0].values())


# ---------------------------------------------------------------------------------------------
# Match study


@dataclass
class MatchStudy:
    """The long match table of one model and what the heatmaps and summary need.

    ``tiles[strategy, sample]`` holds, per heatmap layer, the (original, variant) ``TILE`` of the
    variant with the lowest similarity; ``active_fraction`` is per layer, over the originals.
    """

    table: pd.DataFrame
    starts: list[int]
    heatmap_layers: list[int]
    tiles: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]]
    active_fraction: dict[int, float]


def match_study(
    model: torch.nn.Module,
    tokenizer,
    corpus_ids: Sequence[int],
    *,
    samples: int,
    length: int,
    strategies: Sequence[str],
    similarities: Sequence[float] = patterns.PAPER_SIMILARITIES,
    hot_fraction: float = 0.5,
    seed: int = 0,
) -> MatchStudy:
    """Patterns of every sample and each of its variants, compared layer by layer.

    Variants are drawn with a generator seeded by (seed, sample, strategy), so adding a sample
    or a strategy leaves the others' variants unchanged. Columns: ``MATCH`` without model.
    """
    _check_length(model, length)
    unknown = sorted(set(strategies) - set(patterns.STRATEGIES))
    if unknown:
        raise ValueError(f"unknown edit strategies {unknown}; choose from {patterns.STRATEGIES}")
    bos = models.bos_id(tokenizer)
    vocab = min(len(tokenizer), model.config.vocab_size)
    editor = Editor(tokenizer, corpus_ids, similarities, vocab)
    chosen = choose_samples(corpus_ids, samples, length, seed)
    heatmap_layers = patterns.paper_layers(len(decoder_layers(model)))
    lowest = min(similarities)
    frames, tiles, density = [], {}, defaultdict(list)
    for index, (start, ids) in enumerate(chosen):
        cache: dict[tuple[int, ...], list[np.ndarray]] = {}
        for strategy in strategies:
            edits = editor.edits(ids, strategy, np.random.default_rng([seed, index, patterns.STRATEGIES.index(strategy)]))
            key = tuple(edits.original)
            if key not in cache:
                cache[key] = _all_layers(model, edits.original, bos)
                for layer, p in enumerate(cache[key]):
                    density[layer].append(p.mean())
            original = cache[key]
            for nominal, variant_ids in edits.variants:
                variant = _all_layers(model, variant_ids, bos)
                pair = patterns.PatternPair(index, nominal, edits.original, variant_ids, original, variant)
                frames.append(patterns.match_table([pair], hot_fraction, TILE).assign(strategy=strategy))
                if nominal == lowest:
                    tiles[strategy, index] = [(_tile(original[i]), _tile(variant[i])) for i in heatmap_layers]
        log.info("sample %d (tokens %d..%d) done", index, start, start + length)
    table = pd.concat(frames, ignore_index=True)[list(MATCH[1:])]
    active = {layer: float(np.mean(values)) for layer, values in density.items()}
    return MatchStudy(table, [start for start, _ in chosen], heatmap_layers, tiles, active)


def _check_length(model: torch.nn.Module, length: int) -> None:
    limit = model.config.max_position_embeddings - 1  # one position goes to BOS
    if length > limit:
        raise ValueError(f"patterns.length {length} exceeds the model's context of {limit} text tokens")


def _tile(pattern: np.ndarray) -> np.ndarray:
    return pattern[: TILE[0], : TILE[1]]


def ranked_samples(table: pd.DataFrame, strategy: str, similarity: float) -> tuple[int, int]:
    """(best, worst) sample: highest and lowest ``RANKING_METRIC`` averaged over layers."""
    rows = table[(table["strategy"] == strategy) & (table["similarity"] == similarity)
                 & (table["metric"] == RANKING_METRIC)]
    means = rows.groupby("sample")["match_rate"].mean()
    return int(means.idxmax()), int(means.idxmin())


def plot_heatmaps(study: MatchStudy, strategy: str, png: Path) -> Figure:
    """Figs 9-12: the ``TILE`` (neurons x tokens) of original and lowest-similarity variant at the
    heatmap layers, for the best and the worst sample. Black = active."""
    lowest = float(study.table["similarity"].min())
    best, worst = ranked_samples(study.table, strategy, lowest)
    layers = study.heatmap_layers
    figure = Figure(figsize=(2.4 * len(layers), 10))
    axes = figure.subplots(4, len(layers), squeeze=False, sharex=True, sharey=True)
    for row, (rank, sample, side) in enumerate(
        [("best", best, 0), ("best", best, 1), ("worst", worst, 0), ("worst", worst, 1)]
    ):
        for ax, layer, pair in zip(axes[row], layers, study.tiles[strategy, sample]):
            ax.imshow(pair[side].T, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
            what = "original" if side == 0 else f"{lowest:.0%} variant: {patterns.paper_match_rate(*pair, None):.1%} match"
            ax.set_title(f"{rank} (sample {sample}), layer {layer}\n{what}", fontsize=8)
        axes[row, 0].set_ylabel("neuron")
    for ax in axes[-1]:
        ax.set_xlabel("token")
    figure.suptitle(f"Activation patterns, {strategy} edits\n"
                    f"the first {TILE[0]} tokens and FFN neurons 0-{TILE[1] - 1} of each layer", y=0.99)
    figure.legend(handles=[Patch(facecolor="black", label="active neuron"),
                           Patch(facecolor="white", edgecolor="grey", label="inactive neuron")],
                  loc="upper center", bbox_to_anchor=(0.5, 0.945), ncols=2, fontsize=8, frameon=False)
    figure.subplots_adjust(left=0.08, right=0.98, top=0.88, bottom=0.05, hspace=0.35, wspace=0.1)
    tables.save_figure(figure, png)
    return figure


# ---------------------------------------------------------------------------------------------
# Predictor study


def gather_activity(
    model: torch.nn.Module, ids: Sequence[int], bos: int, window: int, layers: Sequence[int] | None,
    ffn_in_layers: Sequence[int] = (), residual: bool = False,
) -> Activity:
    """``forward_activity`` over consecutive windows of ``ids``, concatenated along the tokens."""
    parts = [forward_activity(model, ids[start : start + window], bos, layers, ffn_in_layers, residual)
             for start in range(0, len(ids), window)]

    def join(field: str) -> dict[int, np.ndarray]:
        return {key: np.concatenate([getattr(part, field)[key] for part in parts]) for key in getattr(parts[0], field)}

    return Activity(join("patterns"), join("ffn_in"), join("residual"))


def target_layers(n_layers: int, source_layer: int, targets: Sequence[int] | None) -> list[int]:
    """Configured targets, checked; by default the paper's layers (L/3, 2L/3, last) past the source."""
    if not 0 <= source_layer < n_layers - 1:
        raise ValueError(f"predictor.source_layer must be in [0, {n_layers - 2}] (a deeper layer must exist), "
                         f"got {source_layer}")
    chosen = [t for t in patterns.paper_layers(n_layers) if t > source_layer] if targets is None else sorted(set(targets))
    if not chosen or any(not source_layer < t < n_layers for t in chosen):
        raise ValueError(f"predictor.target_layers must lie in ({source_layer}, {n_layers - 1}], got {targets}")
    return chosen


def lookahead_source(layer: int, lookahead: int) -> int:
    """The layer whose input the lookahead predictor of ``layer`` reads.

    k = 0: the layer itself (its FFN input, as in Deja Vu). k >= 1: the residual-stream input of
    layer ``layer - k``, known k layers before the FFN runs, which leaves that long to fetch;
    layers before the k-th read layer 0's input (the embeddings: the earliest state there is).
    """
    if lookahead < 0:
        raise ValueError(f"predictor.lookahead must be >= 0, got {lookahead}")
    return max(layer - lookahead, 0)


def lookahead_features(activity: Activity, layer: int, lookahead: int) -> np.ndarray:
    """What the lookahead predictor of ``layer`` reads (``lookahead_source``)."""
    return activity.ffn_in[layer] if lookahead == 0 else activity.residual[lookahead_source(layer, lookahead)]


def _neuron_weights(model: torch.nn.Module) -> tuple[list[torch.Tensor], int]:
    """The FFN weight matrices of one layer and its neuron count."""
    layer = decoder_layers(model)[0]
    anatomy = anatomy_of(model)
    weights = [layer.get_submodule(path).weight for path in anatomy.ffn_projections]
    return weights, layer.get_submodule(anatomy.down).in_features


def weights_per_neuron(model: torch.nn.Module) -> int:
    """Weights of one FFN neuron in one layer: its gate and up rows and down column."""
    weights, neurons = _neuron_weights(model)
    return sum(w.numel() for w in weights) // neurons


def bytes_per_neuron(model: torch.nn.Module) -> int:
    """Bytes of one FFN neuron's weights in one layer, in the model's dtype."""
    weights, neurons = _neuron_weights(model)
    return sum(w.numel() * w.element_size() for w in weights) // neurons


NO_INPUT = -1  # source_layer of the static baselines and the oracle: they read nothing per token
LATENCY_FEATURES = ("lookahead", "frequency")  # the per-token predictors the latency model compares


@dataclass(frozen=True)
class Prediction:
    """One predictor's output for one layer.

    ``predicted``: the active mask it predicts (None for the oracle: exact by definition);
    ``scores``: its fetch order (None for a static set, whose order at a budget is frequency's);
    ``cost``: its parameters and FLOPs per token.
    """

    features: str
    layer: int
    source_layer: int
    predicted: np.ndarray | None
    scores: np.ndarray | None
    cost: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class PredictorTables:
    """``PREDICTOR``, ``PREFETCH`` and ``LATENCY`` rows of one model, without the model column."""

    predictor: pd.DataFrame
    prefetch: pd.DataFrame
    latency: pd.DataFrame


def predictor_study(
    model: torch.nn.Module,
    tokenizer,
    train_ids: Sequence[int],
    eval_ids: Sequence[int],
    *,
    window: int,
    source_layer: int,
    targets: Sequence[int] | None,
    hidden: int,
    epochs: int,
    budgets: Sequence[float],
    lookahead: int = 1,
    rank: int = 64,
    hot_fraction: float = 0.5,
    hardware: Sequence[patterns.Hardware] = (),
    seed: int = 0,
) -> PredictorTables:
    """Predict active neurons per token, train on ``train_ids``, score on ``eval_ids``.

    Per layer: a ``lookahead`` MLP of ``rank`` hidden units on ``lookahead_features``, the static
    ``frequency`` baseline (the most often active neurons, as many as are active on average),
    the static ``hot_set`` (the neurons active on at least ``hot_fraction`` of the calibration
    tokens, PowerInfer's hot neurons) and the ``oracle`` (the true mask). For the configured
    targets also the long-range MLPs from ``source_layer``: on its FFN input (``hidden_state``)
    and on its pattern (``pattern``). MLP masks threshold the probability at 0.5; prefetching
    ranks neurons by score.
    """
    _check_length(model, window)
    n_layers = len(decoder_layers(model))
    chosen = target_layers(n_layers, source_layer, targets)
    if lookahead >= n_layers:
        raise ValueError(f"predictor.lookahead must be below the model's {n_layers} layers, got {lookahead}")
    every = list(range(n_layers))
    ffn_in = sorted({source_layer, *(every if lookahead == 0 else ())})
    bos = models.bos_id(tokenizer)
    train, test = (gather_activity(model, ids, bos, window, None, ffn_in, lookahead > 0) for ids in (train_ids, eval_ids))
    log.info("predictor: %d training and %d evaluation tokens, lookahead %d, long-range targets %s",
             train.tokens, test.tokens, lookahead, chosen)

    def mlp(features: str, layer: int, source: int, x_train: np.ndarray, x_test: np.ndarray, units: int) -> Prediction:
        net = patterns.train_predictor(x_train, train.patterns[layer], units, epochs, seed)
        scores = net.scores(x_test)
        return Prediction(features, layer, source, scores >= patterns.ACTIVE_SCORE, scores,
                          patterns.mlp_cost(x_train.shape[1], units, scores.shape[1]))

    started = time.perf_counter()
    predictions = [
        mlp("lookahead", layer, lookahead_source(layer, lookahead), lookahead_features(train, layer, lookahead),
            lookahead_features(test, layer, lookahead), rank)
        for layer in every
    ]
    log.info("lookahead predictors of %d layers trained and scored in %.1f s", n_layers, time.perf_counter() - started)
    for layer in chosen:
        predictions.append(mlp("hidden_state", layer, source_layer, train.ffn_in[source_layer],
                               test.ffn_in[source_layer], hidden))
        predictions.append(mlp("pattern", layer, source_layer, train.patterns[source_layer],
                               test.patterns[source_layer], hidden))
    for layer in every:
        seen = train.patterns[layer]
        predictions += [
            Prediction("frequency", layer, NO_INPUT, patterns.frequency_baseline(seen), seen.mean(0)),
            Prediction("hot_set", layer, NO_INPUT, patterns.hot_neurons(seen, hot_fraction), None),
            Prediction("oracle", layer, NO_INPUT, None, test.patterns[layer].astype(np.float32)),
        ]
    ffn_weights = weights_per_neuron(model) * train.patterns[0].shape[1]
    return PredictorTables(
        _quality_rows(predictions, test, ffn_weights).assign(train_tokens=train.tokens, eval_tokens=test.tokens),
        *_prefetch_rows(predictions, test, weights_per_neuron(model), bytes_per_neuron(model), budgets, hardware),
    )


def _quality_rows(predictions: Sequence[Prediction], test: Activity, ffn_weights: int) -> pd.DataFrame:
    """Precision, recall, F1 and cost of every prediction with a mask: ``PREDICTOR`` minus model and token counts."""
    rows = []
    for p in predictions:
        if p.predicted is None:
            continue
        actual = test.patterns[p.layer]
        params, flops = p.cost
        rows.append({"features": p.features, "source_layer": p.source_layer, "target_layer": p.layer,
                     **patterns.evaluate_predictor(p.predicted, actual), "active_fraction": float(actual.mean()),
                     "predictor_params": params, "params_fraction": params / ffn_weights,
                     "flops_fraction": flops / (2 * ffn_weights)})
    return pd.DataFrame(rows)


def _prefetch_rows(
    predictions: Sequence[Prediction], test: Activity, weights_per_row: int, bytes_per_row: int,
    budgets: Sequence[float], hardware: Sequence[patterns.Hardware],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The prefetch sweep of every prediction with a fetch order, and the latency model of the
    ``LATENCY_FEATURES`` over all layers: ``PREFETCH`` and ``LATENCY`` without model."""
    by_features: dict[str, dict[int, Prediction]] = defaultdict(dict)
    for p in predictions:
        if p.scores is not None:
            by_features[p.features][p.layer] = p
    sweeps, latencies = [], []
    for features, by_layer in by_features.items():
        rankings = {layer: patterns.Ranking.of(p.scores, test.patterns[layer]) for layer, p in sorted(by_layer.items())}
        sources = {layer: p.source_layer for layer, p in by_layer.items()}
        sweep = patterns.prefetch_table(rankings, bytes_per_row, budgets)
        sweeps.append(sweep.assign(features=features, source_layer=sweep["layer"].map(sources)))
        if features in LATENCY_FEATURES and hardware:
            latencies.append(patterns.latency_table(rankings, weights_per_row, hardware, budgets).assign(features=features))
    latency = pd.concat(latencies, ignore_index=True) if latencies else pd.DataFrame(columns=list(LATENCY))
    return pd.concat(sweeps, ignore_index=True)[list(PREFETCH[1:])], latency[list(LATENCY[1:])]


# ---------------------------------------------------------------------------------------------
# Workflow stages


def run_match_study(
    model_dir: Path,
    corpus_path: Path,
    thresholds: Path,
    out_table: Path,
    out_summary: Path,
    heatmaps: Sequence[Path],
    samples: int,
    length: int,
    strategies: Sequence[str],
    similarities: Sequence[float],
    hot_fraction: float,
    seed: int,
    dtype: str,
    device: str,
    provenance: dict,
) -> None:
    """The match table, one heatmap figure (PNG + PDF) per strategy in ``heatmaps`` order, and a
    JSON summary: samples, best and worst, active fraction and chance agreement per layer."""
    if len(heatmaps) != len(strategies):
        raise ValueError(f"need one heatmap path per strategy {list(strategies)}, got {len(heatmaps)}")
    model, tokenizer = models.load_model(model_dir, device, dtype)
    corpus = corpora.load_corpus(corpus_path)["input_ids"].tolist()
    with stages.sparsified(model, [thresholds], "all") as measured:
        study = match_study(model, tokenizer, corpus, samples=samples, length=length, strategies=strategies,
                            similarities=similarities, hot_fraction=hot_fraction, seed=seed)
    name = Path(model_dir).name
    _write_csv(study.table.assign(model=name)[list(MATCH)], MATCH_KEYS, out_table)
    lowest = min(similarities)
    for strategy, png in zip(strategies, heatmaps):
        plot_heatmaps(study, strategy, png)
    ranked = {s: dict(zip(("best", "worst"), ranked_samples(study.table, s, lowest))) for s in strategies}
    write_json(Path(out_summary), {
        "model": name,
        **_threshold_facts(thresholds),
        "achieved_sparsity": sparsifier.achieved_sparsity(measured),
        "samples": [{"sample": k, "start": start, "length": length} for k, start in enumerate(study.starts)],
        "ranked_at_lowest_similarity": ranked,
        "active_fraction": study.active_fraction,
        "chance_agreement": {layer: patterns.chance_agreement(d, d) for layer, d in study.active_fraction.items()},
        "provenance": provenance,
    })


def run_predictor_study(
    model_dir: Path,
    train_corpus: Path,
    eval_corpus: Path,
    thresholds: Path,
    out_predictor: Path,
    out_prefetch: Path,
    out_latency: Path,
    out_summary: Path,
    figure: Path,
    latency_figure: Path,
    window: int,
    predictor: dict,
    hot_fraction: float,
    seed: int,
    dtype: str,
    device: str,
    provenance: dict,
) -> None:
    """Predictor, prefetch and latency tables, the recall-vs-bytes and the latency figures (PNG +
    PDF) and a JSON summary.

    ``predictor``: the config block (source_layer, target_layers, hidden, epochs, budgets,
    train_tokens, eval_tokens, lookahead, rank, hardware); the token counts are upper bounds, cut
    to the corpora.
    """
    model, tokenizer = models.load_model(model_dir, device, dtype)
    train_ids = corpora.load_corpus(train_corpus)["input_ids"][: predictor["train_tokens"]].tolist()
    eval_ids = corpora.load_corpus(eval_corpus)["input_ids"][: predictor["eval_tokens"]].tolist()
    hardware = [patterns.Hardware(name, **spec) for name, spec in sorted(predictor["hardware"].items())]
    with stages.sparsified(model, [thresholds], "all") as measured:
        found = predictor_study(
            model, tokenizer, train_ids, eval_ids, window=window, source_layer=predictor["source_layer"],
            targets=predictor["target_layers"], hidden=predictor["hidden"], epochs=predictor["epochs"],
            budgets=predictor["budgets"], lookahead=predictor["lookahead"], rank=predictor["rank"],
            hot_fraction=hot_fraction, hardware=hardware, seed=seed,
        )
    name = Path(model_dir).name
    _write_csv(found.predictor.assign(model=name)[list(PREDICTOR)], PREDICTOR_KEYS, out_predictor)
    _write_csv(found.prefetch.assign(model=name)[list(PREFETCH)], PREFETCH_KEYS, out_prefetch)
    _write_csv(found.latency.assign(model=name)[list(LATENCY)], LATENCY_KEYS, out_latency)
    long_range = set(found.prefetch.loc[found.prefetch["features"] == "hidden_state", "layer"])
    shown = found.prefetch[found.prefetch["layer"].isin(long_range) & (found.prefetch["features"] != "oracle")]
    for path in (figure, Path(figure).with_suffix(".pdf")):
        patterns.plot_prefetch(shown, path)
    for path in (latency_figure, Path(latency_figure).with_suffix(".pdf")):
        patterns.plot_latency(found.latency, path, headline="lookahead")
    write_json(Path(out_summary), {
        "model": name,
        **_threshold_facts(thresholds),
        "achieved_sparsity": sparsifier.achieved_sparsity(measured),
        "bytes_per_neuron": bytes_per_neuron(model),
        "weights_per_neuron": weights_per_neuron(model),
        "lookahead": predictor["lookahead"],
        "mean_f1": found.predictor.groupby("features")["f1"].mean().to_dict(),
        "provenance": provenance,
    })


def _threshold_facts(path: Path) -> dict:
    metadata = methods.load_thresholds(path)[1]
    return {"method": metadata["method"], "target_sparsity": metadata["target_sparsity"]}


def pattern_tables(
    match_csvs: Sequence[Path],
    predictor_csvs: Sequence[Path],
    prefetch_csvs: Sequence[Path],
    latency_csvs: Sequence[Path],
    out_match: Path,
    out_table_ii: Path,
    out_predictor: Path,
    out_prefetch: Path,
    out_latency: Path,
) -> None:
    """Every model's tables in one, and the Table-II pivot of the match table."""
    match = _concat(match_csvs)
    _write_csv(match[list(MATCH)], MATCH_KEYS, out_match)
    _write_csv(table_ii_pivot(match), TABLE_II_KEYS, out_table_ii)
    _write_csv(_concat(predictor_csvs)[list(PREDICTOR)], PREDICTOR_KEYS, out_predictor)
    _write_csv(_concat(prefetch_csvs)[list(PREFETCH)], PREFETCH_KEYS, out_prefetch)
    _write_csv(_concat(latency_csvs)[list(LATENCY)], LATENCY_KEYS, out_latency)


def table_ii_pivot(match: pd.DataFrame) -> pd.DataFrame:
    """``patterns.table_ii`` for every (model, strategy, metric): rows (model, strategy, metric,
    layer, sample) over the first, L/3, 2L/3 and last layers (layer 0 is the paper's Table II),
    one column per nominal similarity (labelled with two decimals), highest first."""
    parts = []
    for (model, strategy, metric), rows in match.groupby(["model", "strategy", "metric"]):
        wide = patterns.table_ii(rows, metric)
        wide.columns = [f"{s:.2f}" for s in wide.columns]
        parts.append(wide.reset_index().assign(model=model, strategy=strategy, metric=metric))
    frame = pd.concat(parts, ignore_index=True)
    return frame[list(TABLE_II_KEYS) + [c for c in frame.columns if c not in TABLE_II_KEYS]]


def _concat(paths: Sequence[Path]) -> pd.DataFrame:
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def _write_csv(frame: pd.DataFrame, keys: Sequence[str], path: Path) -> None:
    """Rows sorted by ``keys`` (similarity high to low, as in the paper): reruns write identical bytes."""
    frame = frame.sort_values(list(keys), ascending=[k != "similarity" for k in keys], kind="stable")
    write_text(Path(path), frame.to_csv(index=False))
