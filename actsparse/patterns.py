"""Input-variant pattern matching, an activation predictor and a prefetch simulation.

This is the seed paper's section V (Table II, Figs 9-12) plus the predictor it only proposes.
A *pattern* is a bool array ``[tokens, neurons]`` for one layer: True where the FFN neuron is
active, i.e. its down_proj input is nonzero under the fitted thresholds (for cats and chess:
where act(gate) survives). Everything here is a pure function of token ids, words and
patterns so that it is testable without a model; ``pattern_study`` wires it to a model.
Layers are numbered from 0 (the paper's "Layer 1" is layer 0 here).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from actsparse.provenance import write_figure

PAPER_SIMILARITIES = (0.95, 0.90, 0.85, 0.80, 0.75, 0.70)
STRATEGIES = ("token", "word")

# ---------------------------------------------------------------------------------------------
# Variants


@dataclass(frozen=True)
class Variant:
    """One edited copy of a sample.

    ``measured`` is the fraction of the original's positions left unchanged, counted in the
    unit that was edited (tokens or words); ``changed`` marks the edited positions.
    """

    nominal: float
    measured: float
    items: list
    changed: np.ndarray


def make_variants(
    seq: Sequence,
    similarities: Sequence[float] = PAPER_SIMILARITIES,
    strategy: str = "token",
    rng: np.random.Generator | int = 0,
    *,
    vocab_size: int | None = None,
    special_ids: Iterable[int] = (),
    word_pool: Sequence[str] | None = None,
    length_key: Callable[[str], Hashable] | None = None,
) -> list[Variant]:
    """Edited copies of ``seq``, one per similarity: similarity s changes round((1-s)*L) positions.

    ``strategy="token"``: ``seq`` is token ids; each chosen position gets a uniformly drawn id
    from ``range(vocab_size)`` that differs from the original and is not in ``special_ids``.
    Positions that hold a special id (e.g. bos) are never edited: they are structure, not
    content. The measured similarity is then exact: 1 - round((1-s)*L)/L, within 1/(2L) of s
    (within 1 point for L >= 50), and equals ``aligned_similarity(seq, variant.items)``.

    ``strategy="word"``: ``seq`` is a list of words; each chosen word is replaced by a different
    word drawn uniformly from the distinct words of ``word_pool`` (default: the sample's own
    words, i.e. words drawn from the corpus). ``measured`` counts words. The caller tokenises
    each variant and measures token similarity with ``aligned_similarity``: it differs from the
    word similarity because words span different numbers of tokens, and a replacement with a
    different token count shifts every later position (position-aligned similarity then falls
    towards chance). Pass ``length_key`` (e.g. the word's token count) to draw replacements only
    among pool words with the same key, which keeps positions aligned.

    Variants are nested: the positions edited at 90% include those edited at 95% with the same
    replacements, so differences between similarity levels come from the amount of editing
    alone, not from a fresh random draw.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if not similarities or any(not 0.0 < s <= 1.0 for s in similarities):
        raise ValueError(f"similarities must be non-empty and in (0, 1], got {similarities}")
    if len(seq) == 0:
        raise ValueError("cannot make variants of an empty sequence")
    if strategy == "token":
        items, candidates = _token_candidates(seq, vocab_size, special_ids)
    elif not all(isinstance(word, str) for word in seq):
        raise ValueError("the word strategy needs a list of words (str)")
    else:
        items, candidates = _word_candidates(seq, word_pool, length_key)
    return _nested_variants(items, candidates, similarities, np.random.default_rng(rng))


def _token_candidates(
    ids: Sequence[int], vocab_size: int | None, special_ids: Iterable[int]
) -> tuple[list[int], list[np.ndarray]]:
    if vocab_size is None:
        raise ValueError("the token strategy needs vocab_size")
    items = [int(i) for i in ids]
    if min(items) < 0 or max(items) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got range [{min(items)}, {max(items)}]")
    specials = {int(s) for s in special_ids}
    allowed = np.setdiff1d(np.arange(vocab_size), list(specials))
    none = allowed[:0]
    return items, [none if i in specials else allowed for i in items]


def _word_candidates(
    words: Sequence[str], pool: Sequence[str] | None, length_key: Callable[[str], Hashable] | None
) -> tuple[list[str], list[np.ndarray]]:
    key = length_key or (lambda _word: None)
    groups: dict[Hashable, set[str]] = defaultdict(set)
    for word in words if pool is None else pool:
        groups[key(word)].add(word)
    by_key = {k: np.array(sorted(group)) for k, group in groups.items()}
    none = np.array([], dtype=str)
    return list(words), [by_key.get(key(word), none) for word in words]


def _n_changes(similarity: float, length: int) -> int:
    """round((1-s)*L) rounding halves up; the epsilon absorbs float error such as (1-0.95)*10."""
    return math.floor((1.0 - similarity) * length + 0.5 + 1e-9)


def _n_alternatives(original, candidates: np.ndarray) -> int:
    i = int(np.searchsorted(candidates, original))
    present = i < len(candidates) and candidates[i] == original
    return len(candidates) - int(present)


def _draw_other(original, candidates: np.ndarray, rng: np.random.Generator):
    """Uniform draw from the sorted ``candidates`` minus ``original``, without rejection loops."""
    i = int(np.searchsorted(candidates, original))
    j = int(rng.integers(_n_alternatives(original, candidates)))
    skip = i < len(candidates) and candidates[i] == original and j >= i
    return candidates[j + skip].item()


def _nested_variants(
    items: list, candidates: list[np.ndarray], similarities: Sequence[float], rng: np.random.Generator
) -> list[Variant]:
    length = len(items)
    eligible = [i for i, (item, c) in enumerate(zip(items, candidates)) if _n_alternatives(item, c) > 0]
    counts = [_n_changes(s, length) for s in similarities]
    if max(counts) > len(eligible):
        raise ValueError(
            f"similarity {min(similarities)} needs {max(counts)} edits but only {len(eligible)} of "
            f"{length} positions have a replacement (special ids, or no other pool word with the same key)"
        )
    order = rng.permutation(eligible)[: max(counts)]
    replacements = [_draw_other(items[i], candidates[i], rng) for i in order]
    variants = []
    for similarity, count in zip(similarities, counts):
        edited, changed = list(items), np.zeros(length, dtype=bool)
        for i, replacement in zip(order[:count], replacements[:count]):
            edited[i], changed[i] = replacement, True
        variants.append(Variant(similarity, 1.0 - count / length, edited, changed))
    return variants


def unchanged_positions(a_ids: Sequence[int], b_ids: Sequence[int]) -> np.ndarray:
    """bool ``[len(a)]``: True where ``b`` holds the same token at the same position as ``a``.

    Positions of ``a`` past the end of ``b`` count as changed. Tokens of ``b`` past the end of
    ``a`` are ignored: comparisons visit only the original's positions, and in a causal model
    appended tokens cannot alter the patterns there.
    """
    a, b = np.asarray(a_ids), np.asarray(b_ids)
    if a.ndim != 1 or b.ndim != 1 or a.size == 0:
        raise ValueError(f"need two 1-D id sequences, the first non-empty; got shapes {a.shape}, {b.shape}")
    same = np.zeros(a.size, dtype=bool)
    n = min(a.size, b.size)
    same[:n] = a[:n] == b[:n]
    return same


def aligned_similarity(a_ids: Sequence[int], b_ids: Sequence[int]) -> float:
    """Fraction of the original ``a``'s positions where ``b`` has the identical token.

    The denominator is len(a): missing tokens count as changes, extra trailing tokens in ``b``
    do not count (see ``unchanged_positions``). Position-aligned on purpose: it is the
    similarity the position-aligned pattern metrics actually see.
    """
    return float(unchanged_positions(a_ids, b_ids).mean())


# ---------------------------------------------------------------------------------------------
# Match rates


def _as_patterns(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, q = np.asarray(p), np.asarray(q)
    if p.dtype != bool or q.dtype != bool or p.ndim != 2 or q.ndim != 2:
        raise ValueError(f"patterns must be 2-D bool [tokens, neurons]; got {p.dtype}{p.shape}, {q.dtype}{q.shape}")
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"patterns have different neuron counts: {p.shape[1]} vs {q.shape[1]}")
    return p, q


def token_aligned_agreement(p: np.ndarray, q: np.ndarray, unchanged_mask: np.ndarray | None = None) -> float:
    """Fraction of (token, neuron) cells where both patterns agree (both active or both inactive).

    Only positions t with ``unchanged_mask[t]`` count (all of ``p``'s positions when None), so
    the rate measures how much the edits elsewhere in the context moved the pattern of the
    tokens that stayed the same. ``q`` may be longer than ``p``; every counted position must
    exist in both.
    """
    p, q = _as_patterns(p, q)
    mask = np.ones(len(p), dtype=bool) if unchanged_mask is None else np.asarray(unchanged_mask, dtype=bool)
    if mask.shape != (len(p),):
        raise ValueError(f"unchanged_mask has shape {mask.shape}, expected ({len(p)},)")
    rows = np.flatnonzero(mask)
    if rows.size == 0:
        raise ValueError("no unchanged position to compare")
    if rows[-1] >= len(q):
        raise ValueError(f"unchanged position {rows[-1]} is past the end of the variant pattern ({len(q)} tokens)")
    return float((p[rows] == q[rows]).mean())


def hot_neurons(pattern: np.ndarray, f: float) -> np.ndarray:
    """bool ``[neurons]``: neurons active on at least a fraction ``f`` of the tokens."""
    if not 0.0 < f <= 1.0:
        raise ValueError(f"hot fraction f must be in (0, 1], got {f}")
    return np.asarray(pattern, dtype=bool).mean(axis=0) >= f


def hot_neuron_jaccard(p: np.ndarray, q: np.ndarray, f: float) -> float:
    """Jaccard |A & B| / |A | B| of the hot-neuron sets (``hot_neurons``) of the two patterns.

    Position-free, so it also compares variants whose token counts differ: it asks whether
    the same rows of the weight matrices are worth keeping resident. Two empty sets are
    identical and score 1.0.
    """
    p, q = _as_patterns(p, q)
    a, b = hot_neurons(p, f), hot_neurons(q, f)
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def paper_match_rate(p: np.ndarray, q: np.ndarray, window: tuple[int, int] | None = (64, 64)) -> float:
    """Position-aligned cell agreement over a fixed tile of the pattern, edited positions included.

    The paper does not define "match rate"; this is the reading its numbers support:

    1. Exact 100% at every layer up to the last (Sample 1, Figs 9-10) at 70% similarity, and the
       same rate at 95% and 70% for 11 of 12 samples (Table II). A metric that looks at edited
       tokens, or at later tokens whose context was edited, drifts with the amount of editing
       and is not exactly 100% at layer 32. A fixed tile of positions that all precede the
       first edit is exactly 100%, because a causal model's activations at position t depend
       only on tokens up to t. (So the paper's edits spared the start of each sample: edits at
       uniformly random positions, as ``make_variants`` makes, leave a 64-token tile untouched
       with probability 0.95**64 = 4% at 95% similarity; expect lower rates than the paper's.)
    2. The other values (53%, 57%, 64.06%, 71.51%) sit just above 50%, which is the agreement
       of two *unrelated* patterns at the paper's ~50% sparsity (``chance_agreement``:
       d_p d_q + (1-d_p)(1-d_q) = 0.5). That is what cell agreement gives once alignment is
       lost, e.g. an early edit that changes the token count shifts every later position. A
       Jaccard of unrelated 50%-dense sets would be near 33%, and a token-averaged measure such
       as ``hot_neuron_jaccard`` would not fall from 100% to 53% between 95% and 90% similarity
       (Sample 4).
    3. 64.06% = 2624/4096 and 71.51% = 2929/4096 at the printed precision, while no count out
       of 2048 (the sample's tokens) or any smaller power of two gives 71.51%: the denominator
       is a multiple of 4096 cells, e.g. a 64-token x 64-neuron piece as in the heatmaps.

    So: agreement of the first ``window[0]`` positions x first ``window[1]`` neurons (both
    truncated to what the two patterns share; ``window=None`` compares the whole common
    prefix). Read it against ``chance_agreement``, not against 0.
    """
    p, q = _as_patterns(p, q)
    tokens, neurons = min(len(p), len(q)), p.shape[1]
    if window is not None:
        if min(window) < 1:
            raise ValueError(f"window must be positive (tokens, neurons), got {window}")
        tokens, neurons = min(tokens, window[0]), min(neurons, window[1])
    return token_aligned_agreement(p[:tokens, :neurons], q[:tokens, :neurons])


def chance_agreement(p: np.ndarray | float, q: np.ndarray | float) -> float:
    """Cell agreement expected between unrelated patterns with the densities of ``p`` and ``q``
    (two patterns, or their densities)."""
    dp, dq = float(np.mean(p)), float(np.mean(q))
    return dp * dq + (1.0 - dp) * (1.0 - dq)


@dataclass(frozen=True)
class PatternPair:
    """Patterns of one original sample and one of its variants, one array per layer."""

    sample: Hashable
    similarity: float
    original_ids: Sequence[int]
    variant_ids: Sequence[int]
    original: Sequence[np.ndarray]
    variant: Sequence[np.ndarray]


def match_table(
    pairs: Iterable[PatternPair], hot_fraction: float = 0.5, window: tuple[int, int] | None = (64, 64)
) -> pd.DataFrame:
    """Long-format rows (sample, similarity, measured_similarity, layer, metric, match_rate).

    ``similarity`` is the nominal one; ``measured_similarity`` is ``aligned_similarity`` of the
    token ids, and its unchanged positions are the ones ``token_aligned_agreement`` visits.
    """
    rows = []
    for pair in pairs:
        if len(pair.original) != len(pair.variant):
            raise ValueError(
                f"sample {pair.sample!r}: {len(pair.original)} original vs {len(pair.variant)} variant layers"
            )
        unchanged = unchanged_positions(pair.original_ids, pair.variant_ids)
        measured = aligned_similarity(pair.original_ids, pair.variant_ids)
        metrics: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
            "token_aligned_agreement": lambda p, q: token_aligned_agreement(p, q, unchanged),
            "hot_neuron_jaccard": lambda p, q: hot_neuron_jaccard(p, q, hot_fraction),
            "paper_match_rate": lambda p, q: paper_match_rate(p, q, window),
        }
        for layer, (p, q) in enumerate(zip(pair.original, pair.variant)):
            for name, metric in metrics.items():
                rows.append((pair.sample, pair.similarity, measured, layer, name, metric(p, q)))
    columns = ["sample", "similarity", "measured_similarity", "layer", "metric", "match_rate"]
    return pd.DataFrame(rows, columns=columns)


def paper_layers(n_layers: int) -> list[int]:
    """First, L/3, 2L/3 and last layer (0-based): the paper's Layers 1, 10, 20, 32 for L=32."""
    if n_layers < 1:
        raise ValueError(f"need at least one layer, got {n_layers}")
    return sorted({0, n_layers // 3, 2 * n_layers // 3, n_layers - 1})


def table_ii(
    table: pd.DataFrame, metric: str = "paper_match_rate", layers: Sequence[int] | None = None
) -> pd.DataFrame:
    """Table-II-like frame: rows (layer, sample), columns nominal similarity high to low.

    ``layers`` defaults to ``paper_layers`` of the table's layer count. A repeated
    (sample, similarity, layer) row is an error, not averaged away.
    """
    if metric not in set(table["metric"]):
        raise ValueError(f"metric {metric!r} not in table; have {sorted(set(table['metric']))}")
    chosen = paper_layers(int(table["layer"].max()) + 1) if layers is None else list(layers)
    missing = set(chosen) - set(table["layer"])
    if missing:
        raise ValueError(f"layers {sorted(missing)} not in table")
    rows = table[(table["metric"] == metric) & table["layer"].isin(chosen)]
    wide = rows.pivot(index=["layer", "sample"], columns="similarity", values="match_rate")
    return wide[sorted(wide.columns, reverse=True)]


# ---------------------------------------------------------------------------------------------
# Predictor


ACTIVE_SCORE = 0.5
"""A neuron is predicted active where the predictor's probability is at least this."""


@dataclass
class Predictor:
    """A trained one-hidden-layer MLP; inputs are standardised with the training statistics."""

    net: torch.nn.Sequential
    mean: torch.Tensor
    std: torch.Tensor

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Probability that each target neuron is active, ``[n, neurons]``."""
        with torch.no_grad():
            return torch.sigmoid(self.net(self._standardise(x))).numpy()

    def _standardise(self, x: np.ndarray) -> torch.Tensor:
        return (torch.as_tensor(np.asarray(x, dtype=np.float32)) - self.mean) / self.std


def train_predictor(
    x_early: np.ndarray,
    y_target_active: np.ndarray,
    hidden: int = 256,
    epochs: int = 100,
    seed: int = 0,
    lr: float = 1e-2,
    batch_size: int = 512,
) -> Predictor:
    """Fit an MLP from an early layer's hidden state or pattern ``[n, d]`` to a deeper layer's mask.

    Multi-label BCE, Adam, shuffled mini-batches. Deterministic for a seed on CPU: the seed
    drives the weight init and the shuffling inside a forked RNG, so the caller's global torch
    RNG state is left as it was.
    """
    x = np.asarray(x_early, dtype=np.float32)
    y = np.asarray(y_target_active)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need x [n, d] and y [n, neurons] with the same n > 0; got {x.shape}, {y.shape}")
    if y.dtype != bool:
        raise ValueError(f"y_target_active must be a bool mask, got {y.dtype}")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    mean, std = xt.mean(0), xt.std(0, unbiased=False).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, y.shape[1])
        )
        predictor = Predictor(net, mean, std)
        inputs = predictor._standardise(x)
        optimiser = torch.optim.Adam(net.parameters(), lr=lr)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        for _ in range(epochs):
            for batch in torch.randperm(len(x)).split(batch_size):
                optimiser.zero_grad()
                loss_fn(net(inputs[batch]), yt[batch]).backward()
                optimiser.step()
    return predictor


def mlp_cost(inputs: int, hidden: int, outputs: int) -> tuple[int, int]:
    """Parameters and multiply-add FLOPs per token of ``train_predictor``'s MLP (inputs -> hidden -> outputs).

    The input standardisation folds into the first layer's weights and bias, so it costs nothing.
    """
    return inputs * hidden + hidden + hidden * outputs + outputs, 2 * (inputs * hidden + hidden * outputs)


def _precision_recall(hits: int, predicted: int, actual: int) -> tuple[float, float]:
    """Precision and recall, NaN where the denominator is zero (nothing predicted / nothing active)."""
    precision = hits / predicted if predicted else math.nan
    recall = hits / actual if actual else math.nan
    return precision, recall


def evaluate_predictor(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Micro-averaged precision, recall and F1 over all (token, neuron) cells.

    ``predicted`` broadcasts against ``actual``, so a fixed ``[neurons]`` mask such as
    ``frequency_baseline`` is scored the same way as per-token predictions.
    """
    actual = np.asarray(actual, dtype=bool)
    predicted = np.broadcast_to(np.asarray(predicted, dtype=bool), actual.shape)
    hits = int((predicted & actual).sum())
    precision, recall = _precision_recall(hits, int(predicted.sum()), int(actual.sum()))
    f1 = 2 * hits / (predicted.sum() + actual.sum()) if predicted.any() or actual.any() else math.nan
    return {"precision": precision, "recall": recall, "f1": float(f1)}


def frequency_baseline(train_masks: np.ndarray, k: int | None = None) -> np.ndarray:
    """bool ``[neurons]``: the ``k`` neurons most often active in training, predicted for every token.

    ``k`` defaults to the mean number of active neurons per training token, so the baseline
    predicts as many neurons as are typically active. Ties go to the lower index.
    """
    masks = np.asarray(train_masks, dtype=bool)
    if masks.ndim != 2 or len(masks) == 0:
        raise ValueError(f"train_masks must be [n > 0, neurons], got {masks.shape}")
    k = round(float(masks.sum(axis=1).mean())) if k is None else k
    return _top_rows(masks.mean(axis=0)[None, :], k)[0]


# ---------------------------------------------------------------------------------------------
# Prefetch simulation

DEFAULT_BUDGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _top_rows(scores: np.ndarray, budget_rows: int) -> np.ndarray:
    """bool mask of the ``budget_rows`` highest scores in each row; ties go to the lower index."""
    if not 0 <= budget_rows <= scores.shape[1]:
        raise ValueError(f"budget_rows must be in [0, {scores.shape[1]}], got {budget_rows}")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :budget_rows]
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, top, True, axis=1)
    return mask


@dataclass(frozen=True)
class Ranking:
    """Where one layer's active rows fall in a predictor's fetch order, per token.

    ``hits[t, m]`` is the number of token t's active rows among its ``m`` best-scored rows
    (ties go to the lower index), so one sort answers every budget: fetching ``m`` rows hits
    ``hits[:, m]`` active rows and misses ``active - hits[:, m]``.
    """

    hits: np.ndarray  # int32 [tokens, neurons + 1]

    @classmethod
    def of(cls, scores: np.ndarray, actual_active: np.ndarray) -> Ranking:
        """``scores`` ``[tokens, neurons]`` or a static ``[neurons]``; ``actual_active`` bool ``[tokens, neurons]``."""
        actual = np.asarray(actual_active, dtype=bool)
        if actual.ndim != 2:
            raise ValueError(f"actual_active must be [tokens, neurons], got {actual.shape}")
        scores = np.asarray(scores, dtype=float)
        if scores.ndim == 1:  # one order for every token: sort once
            ranked = actual[:, np.argsort(-scores, kind="stable")]
        else:
            ranked = np.take_along_axis(actual, np.argsort(-scores, axis=1, kind="stable"), axis=1)
        hits = np.zeros((len(actual), actual.shape[1] + 1), dtype=np.int32)
        np.cumsum(ranked, axis=1, out=hits[:, 1:])
        return cls(hits)

    @property
    def neurons(self) -> int:
        return self.hits.shape[1] - 1

    @property
    def active(self) -> np.ndarray:
        """Active rows per token."""
        return self.hits[:, -1]

    def budget_rows(self, fraction: float) -> int:
        """Rows a budget fraction fetches per token: round(fraction * neurons)."""
        return round(fraction * self.neurons)

    def hits_at(self, budget_rows: int) -> np.ndarray:
        if not 0 <= budget_rows <= self.neurons:
            raise ValueError(f"budget_rows must be in [0, {self.neurons}], got {budget_rows}")
        return self.hits[:, budget_rows]


def simulate_prefetch(
    scores: np.ndarray, actual_active: np.ndarray, budget_rows: int, bytes_per_row: int
) -> dict[str, float]:
    """Fetch the ``budget_rows`` best-scored rows per token of one layer and tally the outcome.

    ``scores`` is ``[tokens, neurons]`` or a static ``[neurons]``; a row is one neuron's weights
    (e.g. its gate and up rows and down column), ``bytes_per_row`` bytes. Returns recall (share
    of active rows that were prefetched), precision (share of fetched rows that were active),
    bytes_fetched, dense_bytes (all rows for every token) and late_bytes: the active rows that
    were not prefetched, which a real system loads on demand on the critical path.
    """
    return _tally(Ranking.of(scores, actual_active), budget_rows, bytes_per_row)


def _tally(ranking: Ranking, budget_rows: int, bytes_per_row: int) -> dict[str, float]:
    hits, active = int(ranking.hits_at(budget_rows).sum()), int(ranking.active.sum())
    tokens = len(ranking.hits)
    precision, recall = _precision_recall(hits, tokens * budget_rows, active)
    return {
        "recall": recall,
        "precision": precision,
        "bytes_fetched": tokens * budget_rows * bytes_per_row,
        "dense_bytes": tokens * ranking.neurons * bytes_per_row,
        "late_bytes": (active - hits) * bytes_per_row,
    }


def rank_layers(
    scores_by_layer: Mapping[int, np.ndarray], actual_by_layer: Mapping[int, np.ndarray]
) -> dict[int, Ranking]:
    """``Ranking`` of every layer, in layer order; the two mappings must name the same layers."""
    if set(scores_by_layer) != set(actual_by_layer):
        raise ValueError(f"layers differ: scores {sorted(scores_by_layer)} vs actual {sorted(actual_by_layer)}")
    return {layer: Ranking.of(scores_by_layer[layer], actual_by_layer[layer]) for layer in sorted(scores_by_layer)}


def prefetch_sweep(
    scores_by_layer: Mapping[int, np.ndarray],
    actual_by_layer: Mapping[int, np.ndarray],
    bytes_per_row: int,
    budget_fractions: Sequence[float] = DEFAULT_BUDGETS,
) -> pd.DataFrame:
    """Rows (layer, budget_fraction, recall, precision, bytes_fetched, dense_bytes, late_bytes).

    A budget fraction b fetches round(b * neurons) rows per token.
    """
    return prefetch_table(rank_layers(scores_by_layer, actual_by_layer), bytes_per_row, budget_fractions)


def prefetch_table(
    rankings: Mapping[int, Ranking], bytes_per_row: int, budget_fractions: Sequence[float] = DEFAULT_BUDGETS
) -> pd.DataFrame:
    """``prefetch_sweep`` from rankings made once (``rank_layers``)."""
    rows = [
        {"layer": layer, "budget_fraction": fraction, **_tally(ranking, ranking.budget_rows(fraction), bytes_per_row)}
        for layer, ranking in rankings.items()
        for fraction in budget_fractions
    ]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Latency model


@dataclass(frozen=True)
class Hardware:
    """Where the FFN weights are fetched from and how fast they are used.

    ``bandwidth_gbs``: weight-fetch bandwidth (GB/s, 1e9 bytes) of prefetching from the slow
    memory that holds the weights (flash on a phone, DRAM behind a CPU's cache): rows known
    ahead are read in bulk. ``miss_bandwidth_gbs``: the rate of on-demand reads of missed rows,
    which are found late and read row by row with little to overlap them, so slower.
    ``compute_gflops``: the rate at which held rows are multiplied (GFLOP/s);
    ``bytes_per_weight``: the stored weight format. The defaults and their sources are in
    ``config/schema/config.schema.yaml`` and the README.
    """

    name: str
    bandwidth_gbs: float
    miss_bandwidth_gbs: float
    compute_gflops: float
    bytes_per_weight: float

    def fetch_seconds(self, weights: float) -> float:
        return weights * self.bytes_per_weight / (self.bandwidth_gbs * 1e9)

    def miss_seconds(self, weights: float) -> float:
        return weights * self.bytes_per_weight / (self.miss_bandwidth_gbs * 1e9)

    def compute_seconds(self, weights: float) -> float:
        return 2.0 * weights / (self.compute_gflops * 1e9)  # one multiply-add per weight


def ffn_seconds(
    budget_rows: int, missed: np.ndarray, weights_per_row: float, hardware: Hardware
) -> np.ndarray:
    """Per-token time of one layer's FFN that prefetched ``budget_rows`` rows and missed ``missed``.

    The model (README "Activation patterns and the predictor"): the prefetch is issued ahead
    (the predictor reads an earlier layer), so it overlaps the computation; the layer waits for
    the later of the two. The layer computes every row it holds (prefetched or fetched on
    demand: which prefetched rows are inactive is known only from their activations), and each
    missed active row is then fetched on demand, on the critical path, at the miss bandwidth:
    ``max(fetch(m), compute(m + miss)) + miss_fetch(miss)``. Dense execution is ``m = neurons``,
    ``miss = 0``; an oracle that fetches the active rows first has ``miss = max(active - m, 0)``.
    """
    missed = np.asarray(missed, dtype=float)
    fetch = hardware.fetch_seconds(budget_rows * weights_per_row)
    compute = hardware.compute_seconds((budget_rows + missed) * weights_per_row)
    return np.maximum(fetch, compute) + hardware.miss_seconds(missed * weights_per_row)


def latency_table(
    rankings: Mapping[int, Ranking],
    weights_per_row: float,
    hardware: Sequence[Hardware],
    budget_fractions: Sequence[float] = DEFAULT_BUDGETS,
) -> pd.DataFrame:
    """Expected per-token FFN time summed over the ranked layers, per hardware and budget.

    Rows (hardware, bandwidth_gbs, miss_bandwidth_gbs, compute_gflops, bytes_per_weight, budget_fraction, dense_ms,
    oracle_ms, time_ms, saving_recovered): dense fetches and computes every row; the oracle
    fetches the budget's rows active ones first (``ffn_seconds`` with the fewest misses the
    budget allows); ``time_ms`` is the ranked predictor's; ``saving_recovered`` is
    (dense - time) / (dense - oracle), NaN where the oracle saves nothing (up to rounding).
    """
    rows = []
    for device in hardware:
        for fraction in budget_fractions:
            dense = oracle = time = 0.0
            for ranking in rankings.values():
                m, n = ranking.budget_rows(fraction), ranking.neurons
                dense += float(ffn_seconds(n, np.zeros(1), weights_per_row, device).mean())
                oracle += float(ffn_seconds(m, np.maximum(ranking.active - m, 0), weights_per_row, device).mean())
                time += float(ffn_seconds(m, ranking.active - ranking.hits_at(m), weights_per_row, device).mean())
            saving = dense - oracle
            rows.append({
                "hardware": device.name, "bandwidth_gbs": device.bandwidth_gbs,
                "miss_bandwidth_gbs": device.miss_bandwidth_gbs,
                "compute_gflops": device.compute_gflops, "bytes_per_weight": device.bytes_per_weight,
                "budget_fraction": fraction, "dense_ms": dense * 1e3, "oracle_ms": oracle * 1e3,
                "time_ms": time * 1e3,
                "saving_recovered": (dense - time) / saving if saving > 1e-9 * dense else math.nan,
            })
    return pd.DataFrame(rows)


def plot_prefetch(table: pd.DataFrame, path: str | Path) -> Path:
    """Recall against the share of dense bytes fetched, one line per layer (a colour) and, where
    the table has a ``features`` column, per predictor (a line style), saved as an image.

    Uses the Agg canvas directly rather than pyplot, so no global backend state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    table = table if "features" in table.columns else table.assign(features="")
    layers, features = sorted(set(table["layer"])), sorted(set(table["features"]))
    for (name, layer), rows in table.groupby(["features", "layer"]):
        style = features.index(name)  # a predictor: a line style and a marker, so no two look alike
        axes.plot(
            rows["bytes_fetched"] / rows["dense_bytes"], rows["recall"], markersize=4,
            marker=("o", "s", "^", "D", "v", "x")[style % 6], linestyle=("-", "--", "-.", (0, (1, 1)))[style % 4],
            color=f"C{layers.index(layer) % 10}", label=f"{name}, layer {layer}" if name else f"layer {layer}",
        )
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="random rows")
    axes.set(title="Prefetch: recall of the active weight rows per fetch budget",
             xlabel="bytes fetched / dense bytes", ylabel="recall of active rows", xlim=(0, 1), ylim=(0, 1.02))
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    path = Path(path)
    write_figure(figure, path, dpi=120, bbox_inches="tight")
    return path


def headline_budget(budgets: Sequence[float], wanted: float = 0.4) -> float:
    """The configured budget closest to ``wanted`` (ties to the smaller): the figure's one-glance reading."""
    return min(sorted(budgets), key=lambda b: round(abs(b - wanted), 9))


def _reading(row: pd.DataFrame, name: str) -> str:
    """One glance at one budget: the predictor's time against dense and the oracle."""
    if row.empty:
        return f"no {name} rows"
    r = row.iloc[0]
    share = "" if math.isnan(r.saving_recovered) else f"\nrecovering {r.saving_recovered:.0%} of the oracle's saving"
    return f"{name} {r.time_ms:.3g} ms\nvs dense {r.dense_ms:.3g} ms, oracle {r.oracle_ms:.3g} ms{share}"


def plot_latency(table: pd.DataFrame, path: str | Path, headline: str) -> Path:
    """Per-token FFN time against the prefetch budget, one panel per hardware: dense, the oracle,
    and every predictor of ``table`` (a ``latency_table`` with a ``features`` column). Each
    panel's title reads ``headline``'s time against dense and the oracle, and the share of the
    oracle's saving it recovers, at the budget closest to 40%."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    devices = list(dict.fromkeys(table["hardware"]))
    figure = Figure(figsize=(5.2 * len(devices), 4.2))
    FigureCanvasAgg(figure)
    for index, (axes, device) in enumerate(zip(figure.subplots(1, len(devices), squeeze=False)[0], devices)):
        rows = table[table["hardware"] == device]
        first = rows[rows["features"] == rows["features"].iloc[0]]
        axes.plot(first["budget_fraction"], first["dense_ms"], color="black", label="dense")
        axes.plot(first["budget_fraction"], first["oracle_ms"], color="grey", linestyle="--", label="oracle")
        for colour, (name, group) in enumerate(rows.groupby("features", sort=True)):
            axes.plot(group["budget_fraction"], group["time_ms"], marker="o", markersize=3, color=f"C{colour}",
                      label=name)
        budget = headline_budget(rows["budget_fraction"])
        at = rows[(rows["features"] == headline) & (rows["budget_fraction"] == budget)]
        axes.set_title(f"{device}, {budget:.0%} budget: {_reading(at, headline)}", fontsize=9)
        axes.set(xlabel="prefetch budget (share of rows)", xlim=(0, 1.02), ylim=(0, None))
        if index == 0:
            axes.set_ylabel("FFN time per token (ms)")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    path = Path(path)
    write_figure(figure, path, dpi=120, bbox_inches="tight")
    return path
