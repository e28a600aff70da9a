"""A whole decoding step compiled: the model's decoder layers as one C call each around the
library's own products, so ``decode_speed`` also measures the speedup sparse decoding gives once
the time a dense and a sparse step share outside their weight reads is nearly gone.

Why: through PyTorch's modules a 1.5B model's step spends ~38 ms of ~170 outside the products
(attention, norms, rotary, KV cache and residuals as ~1,000 PyTorch ops, and the Python around
them; bench/RESULTS.md); a dense and a sparse step both pay it, so it caps the ratio whatever the
kernels skip. Here that time drops to ~4 ms (attention, norms, silu, the Python around 28 calls),
which is what a serving engine with compiled layers would see.

The layer is the Llama one (RMSNorm, rotate_half rotary, grouped-query attention with optional
q/k/v biases, a SiLU-gated FFN); an anatomy entry with ``compiled_step`` says its family has it,
and ``unsupported`` refuses models whose configuration departs from it. Its products are the
library's (``kernels.NATIVE_SOURCE``, compiled into the same library): ``dense_matvec``, and on
the layouts and thresholds ``kernels.sparsify_for_decode`` builds, ``sparse_ffn`` for ``act``
(CATS, CHESS) and ``sparse_linear`` for a thresholded input (TEAL; CHESS+'s q and o). Three kinds
of step: ``DENSE`` (every product on the C matvec), ``EVERY`` (the sparse products keeping every
channel) and ``SPARSE`` (thresholded). ``check`` compares them with PyTorch's forward before any
time is reported.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from actsparse import columns, kernels, native
from actsparse.anatomy import anatomy_of, decoder_layers
from actsparse.hooks import Key, hook_sites

log = logging.getLogger(__name__)

_LAYER_SOURCE = r"""
enum { DENSE, EVERY, SPARSE }; /* a step's products: all dense; sparse ones keeping every channel; thresholded */
enum { SITE_ATTN_IN, SITE_O_IN, SITE_FFN_IN, SITE_H, SITE_ACT, SITES }; /* what a threshold reads */

/* One decoder layer's weights; the layouts that are set (not NULL) say which products its sparse
   steps run on the library's kernels: act's FFN kernel (blocks), or the products of thresholded
   inputs (the weights transposed; qkv_rows covers q alone, or q, k and v: qkv_out outputs) */
typedef struct {
    const float *ln1, *wq, *bq, *wk, *bk, *wv, *bv, *wo, *ln2, *wg, *wu, *wd;
    const float *blocks, *qkv_rows, *qkv_bias, *o_rows, *gate_up_rows, *down_rows;
    int64_t qkv_out;
    const float *threshold[SITES];
    int64_t step[SITES]; /* 0: a scalar threshold, 1: one per channel */
    float *kcache, *vcache; /* [kv_heads][max_len][head_dim] */
} Layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, max_len;
    float eps;
    int threads;
    float *h, *qkv, *attn, *o, *gate_up, *y, *scores, *partials, *zero;
    float *active[SITES];
    int64_t *index[SITES]; /* the active channels of the step's last call at each site */
    int64_t count[SITES];
} Step;

static void rmsnorm(const float *x, const float *w, int64_t n, float eps, float *y) {
    float ss = 0;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

/* rotate_half rotary embedding of `count` heads of d floats at one position */
static void rope(float *x, int64_t count, int64_t d, const float *cos, const float *sin) {
    int64_t half = d / 2;
    for (int64_t h = 0; h < count; h++, x += d)
        for (int64_t i = 0; i < half; i++) {
            float a = x[i], b = x[i + half];
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = b * cos[i + half] + a * sin[i + half];
        }
}

static float dot(const float *a, const float *b, int64_t n) {
    vec acc = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc += *(const vec *)(a + i) * *(const vec *)(b + i);
    float sum = hsum(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static float silu(float x) { return x / (1.0f + expf(-x)); }

/* y = w x + bias: on the C matvec, or, where the layer has the transposed rows and the step is not
   dense, over the inputs the site's threshold keeps (every nonzero one in EVERY), as the library's
   SparseInputLinear does: PARTS parts up to COLUMN_SPLIT_OUT outputs, else split by output columns */
static void product(const Layer *L, Step *S, int mode, int site, const float *w, const float *rows,
                    const float *bias, const float *x, int64_t in, int64_t out, float *y) {
    if (mode == DENSE || !rows) {
        dense_matvec(w, bias, x, out, in, y, S->threads);
        return;
    }
    int sparse = mode == SPARSE;
    S->count[site] = sparse_linear(x, sparse ? L->threshold[site] : S->zero, sparse ? L->step[site] : 0, in, in, rows,
                                   bias, out, S->index[site], S->active[site], out <= COLUMN_SPLIT_OUT ? PARTS : 0, S->partials, y,
                                   S->threads);
}

/* x <- one decoder layer of x at position pos, its products read as `mode` says */
void layer_step(const Layer *L, Step *S, float *x, int64_t pos, const float *cos, const float *sin, int mode) {
    int64_t hidden = S->hidden, d = S->head_dim, group = S->heads / S->kv_heads, I = S->inter;
    float *q = S->qkv, *k = q + S->heads * d, *v = k + S->kv_heads * d, *gate = S->gate_up, *up = gate + I;
    int sparse_qkv = mode != DENSE && L->qkv_rows, sparse_ffn_in = mode != DENSE && L->gate_up_rows;
    rmsnorm(x, L->ln1, hidden, S->eps, S->h);
    if (sparse_qkv) product(L, S, mode, SITE_ATTN_IN, NULL, L->qkv_rows, L->qkv_bias, S->h, hidden, L->qkv_out, q);
    else dense_matvec(L->wq, L->bq, S->h, S->heads * d, hidden, q, S->threads);
    if (!sparse_qkv || L->qkv_out == S->heads * d) { /* k and v dense (all, or CHESS+'s kv_dense) */
        dense_matvec(L->wk, L->bk, S->h, S->kv_heads * d, hidden, k, S->threads);
        dense_matvec(L->wv, L->bv, S->h, S->kv_heads * d, hidden, v, S->threads);
    }
    rope(q, S->heads, d, cos, sin);
    rope(k, S->kv_heads, d, cos, sin);
    for (int64_t g = 0; g < S->kv_heads; g++) {
        memcpy(L->kcache + (g * S->max_len + pos) * d, k + g * d, d * sizeof(float));
        memcpy(L->vcache + (g * S->max_len + pos) * d, v + g * d, d * sizeof(float));
    }
    float scale = 1.0f / sqrtf((float)d);
    #pragma omp parallel for num_threads(S->threads) if (S->threads > 1) schedule(static)
    for (int64_t h = 0; h < S->heads; h++) { /* each head its own row of scores */
        const float *qh = q + h * d, *kc = L->kcache + (h / group) * S->max_len * d;
        const float *vc = L->vcache + (h / group) * S->max_len * d;
        float top = -INFINITY, total = 0, *out = S->attn + h * d, *scores = S->scores + h * S->max_len;
        for (int64_t t = 0; t <= pos; t++) {
            scores[t] = dot(qh, kc + t * d, d) * scale;
            top = scores[t] > top ? scores[t] : top;
        }
        for (int64_t t = 0; t <= pos; t++) total += scores[t] = expf(scores[t] - top);
        memset(out, 0, d * sizeof(float));
        for (int64_t t = 0; t <= pos; t++) {
            float p = scores[t] / total;
            for (int64_t i = 0; i < d; i++) out[i] += p * vc[t * d + i];
        }
    }
    product(L, S, mode, SITE_O_IN, L->wo, L->o_rows, NULL, S->attn, S->heads * d, hidden, S->o);
    for (int64_t i = 0; i < hidden; i++) x[i] += S->o[i];
    rmsnorm(x, L->ln2, hidden, S->eps, S->h);
    if (sparse_ffn_in) product(L, S, mode, SITE_FFN_IN, NULL, L->gate_up_rows, NULL, S->h, hidden, 2 * I, gate);
    else dense_matvec(L->wg, NULL, S->h, I, hidden, gate, S->threads);
    #pragma omp parallel for num_threads(S->threads) if (S->threads > 1) schedule(static)
    for (int64_t c = 0; c < I; c++) gate[c] = silu(gate[c]);
    if (mode != DENSE && L->blocks) {
        int sparse = mode == SPARSE;
        S->count[SITE_ACT] = sparse_ffn(gate, sparse ? L->threshold[SITE_ACT] : S->zero, sparse ? L->step[SITE_ACT] : 0,
                                        I, I, L->blocks, NULL, NULL, S->h, hidden, S->index[SITE_ACT],
                                        S->active[SITE_ACT], PARTS, S->partials, S->y, S->threads);
    } else {
        if (!sparse_ffn_in) dense_matvec(L->wu, NULL, S->h, I, hidden, up, S->threads);
        for (int64_t c = 0; c < I; c++) up[c] *= gate[c];
        product(L, S, mode, SITE_H, L->wd, L->down_rows, NULL, up, I, hidden, S->y);
    }
    for (int64_t i = 0; i < hidden; i++) x[i] += S->y[i];
}
"""


DENSE, EVERY, SPARSE = range(3)  # layer_step's modes
SITES = ("attn_in", "o_in", "ffn_in", "h", "act")  # what a threshold reads, in the C enum's order
LOGIT_TOLERANCE = 1e-4  # of the logits' scale: float32 rounding through 28 layers stays ~1e-6
FLIP_DISTANCE = 1e-3  # relative distance from its threshold within which a value's mask may differ by rounding
_POINTERS = ("ln1", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "ln2", "wg", "wu", "wd", "blocks", "qkv_rows", "qkv_bias",
             "o_rows", "gate_up_rows", "down_rows")
_SCRATCH = ("h", "qkv", "attn", "o", "gate_up", "y", "scores", "partials", "zero")


class Layer(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_void_p) for name in _POINTERS), ("qkv_out", ctypes.c_int64),
                ("threshold", ctypes.c_void_p * len(SITES)), ("step", ctypes.c_int64 * len(SITES)),
                ("kcache", ctypes.c_void_p), ("vcache", ctypes.c_void_p)]


class Step(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_int64) for name in ("hidden", "heads", "kv_heads", "head_dim", "inter", "max_len")),
                ("eps", ctypes.c_float), ("threads", ctypes.c_int), *((name, ctypes.c_void_p) for name in _SCRATCH),
                ("active", ctypes.c_void_p * len(SITES)), ("index", ctypes.c_void_p * len(SITES)),
                ("count", ctypes.c_int64 * len(SITES))]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The layer compiled with the kernels' products into one library (None without a compiler)."""
    constants = f"#define PARTS {kernels.PARTS}\n#define COLUMN_SPLIT_OUT {kernels.COLUMN_SPLIT_OUT}\n"
    lib = native.load("compiled decoding step", kernels.NATIVE_SOURCE + constants + _LAYER_SOURCE, ("-fopenmp",))
    if lib is not None:
        lib.layer_step.argtypes = [ctypes.POINTER(Layer), ctypes.POINTER(Step), ctypes.c_void_p, ctypes.c_int64,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


def unsupported(model: nn.Module) -> str | None:
    """Why the C layer cannot run this model, or None: it implements exactly the Llama layer."""
    anatomy, config = anatomy_of(model), model.config
    parameter = next(model.parameters())
    layer = decoder_layers(model, anatomy)[0]
    reasons = {
        f"the {anatomy.family} family has no compiled layer (its anatomy entry's compiled_step)": not anatomy.compiled_step,
        f"{parameter.dtype} on {parameter.device.type} (the layer is float32 on the CPU)":
            parameter.dtype != torch.float32 or parameter.device.type != "cpu",
        f"hidden_act {getattr(config, 'hidden_act', None)!r} (the layer's FFN is SiLU-gated)":
            getattr(config, "hidden_act", None) != "silu",
        "a sliding attention window": bool(getattr(config, "use_sliding_window", False)),
        "biases on o_proj or the FFN projections": any(
            getattr(module, "bias", None) is not None
            for module in (layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)),
        "no C compiler": library() is None,
    }
    return next((reason for reason, refused in reasons.items() if refused), None)


class CompiledDecoder:
    """The model's decoder layers as C calls on its own weights, reading the very layouts and
    thresholds ``kernels.sparsify_for_decode`` builds for the library's kernels: ``act``'s FFN
    blocks (CATS, CHESS), and for a thresholded input the stacked, transposed weights of the
    projections it feeds (TEAL; CHESS+'s ``attn_in`` with ``kv_dense``: q alone). Bad thresholds
    fail there, by name; a model ``unsupported`` names fails here."""

    def __init__(self, model: nn.Module, thresholds: Mapping[Key, torch.Tensor | float], max_len: int,
                 kv_dense: bool = False) -> None:
        if reason := unsupported(model):
            raise ValueError(f"no compiled decoding step for this model: {reason}")
        self.lib = library()
        self.sites = tuple(site for site in SITES if any(component == site for _, component in thresholds))
        self.kv_dense, self.max_len = kv_dense, max_len
        config = model.config
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        d, inter = getattr(config, "head_dim", None) or hidden // heads, config.intermediate_size
        qkv, inputs = (heads + 2 * kv_heads) * d, max(hidden, heads * d, inter)
        self.keep: list[torch.Tensor] = []  # every buffer the C side points into
        scratch = [self._buffer(size) for size in (hidden, qkv, heads * d, hidden, 2 * inter, hidden, heads * max_len,
                                                   kernels.PARTS * max(hidden, qkv, 2 * inter), 1)]
        self.index = [self._keep(torch.empty(inputs, dtype=torch.int64)) for _ in SITES]
        self.shape = Step(hidden, heads, kv_heads, d, inter, max_len, config.rms_norm_eps, torch.get_num_threads(),
                          *scratch, (ctypes.c_void_p * len(SITES))(*(self._buffer(inputs) for _ in SITES)),
                          (ctypes.c_void_p * len(SITES))(*(i.data_ptr() for i in self.index)))
        with kernels.sparsify_for_decode(model, thresholds, kernel="native", kv_dense=kv_dense) as handle:
            self.layers = [self._layer(layer, kv_heads * max_len * d) for layer in decoder_layers(model)]
            self.lm_head = model.get_output_embeddings()  # its stand-in on dense_product (one layout of it)
        self.kernels = handle  # holds the layouts the layers point into
        self.embed, self.norm = model.get_input_embeddings().weight, model.model.norm.weight
        self.x = torch.empty(hidden)
        with torch.inference_mode():  # every position's rotary angles at once: ~90 us a step less
            self.cos, self.sin = (t[0].contiguous() for t in model.model.rotary_emb(self.x[None, None],
                                                                                  torch.arange(max_len)[None]))

    def _layer(self, layer: nn.Module, cache_size: int) -> Layer:
        """One layer's pointers while the sparse modules are attached: each module says whether
        its product runs sparse, on which layout, at which threshold."""
        attention, mlp = layer.self_attn, layer.mlp
        act_kernel = isinstance(mlp, kernels.SparseGatedMLP)
        dense_mlp = mlp.original[0] if act_kernel else mlp  # its projections: dense steps read them
        q, o, gate, down = attention.q_proj, attention.o_proj, dense_mlp.gate_proj, dense_mlp.down_proj
        pointers = dict(
            ln1=layer.input_layernorm.weight, wq=q.weight, bq=q.bias, wk=attention.k_proj.weight,
            bk=attention.k_proj.bias, wv=attention.v_proj.weight, bv=attention.v_proj.bias, wo=o.weight,
            ln2=layer.post_attention_layernorm.weight, wg=gate.weight, wu=dense_mlp.up_proj.weight, wd=down.weight)
        threshold: dict[str, torch.Tensor] = {}
        for site, module, rows, bias in (("attn_in", q, "qkv_rows", "qkv_bias"), ("o_in", o, "o_rows", None),
                                         ("ffn_in", gate, "gate_up_rows", None), ("h", down, "down_rows", None)):
            if isinstance(module, kernels.SparseInputLinear):
                pointers[rows], threshold[site] = module.shared.kernel.rows, module.threshold
                if bias:
                    pointers[bias] = module.shared.kernel.bias
        if act_kernel:
            pointers["blocks"], threshold["act"] = mlp.kernel.blocks, mlp.threshold
        qkv_out = pointers["qkv_rows"].shape[1] if "qkv_rows" in pointers else 0
        thresholds = [None if (t := threshold.get(site)) is None else self._keep(t.contiguous()) for site in SITES]
        return Layer(**{name: None if w is None else w.data_ptr() for name, w in pointers.items()}, qkv_out=qkv_out,
                     threshold=(ctypes.c_void_p * len(SITES))(*(t if t is None else t.data_ptr() for t in thresholds)),
                     step=(ctypes.c_int64 * len(SITES))(*(int(t is not None and t.numel() > 1) for t in thresholds)),
                     kcache=self._buffer(cache_size), vcache=self._buffer(cache_size))

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        self.keep.append(t)
        return t

    def _buffer(self, size: int) -> int:
        return self._keep(torch.zeros(size)).data_ptr()

    @torch.inference_mode()
    def step(self, token: int, pos: int, mode: int, active: list[dict] | None = None) -> torch.Tensor:
        """The logits after ``token`` at position ``pos`` (the KV cache holding positions before
        it), the products read as ``mode`` says. ``active``, if given, gets each layer's active
        channels per thresholded site."""
        if not 0 <= pos < self.max_len:
            raise IndexError(f"position {pos} outside the KV cache of {self.max_len} positions")
        cos, sin = self.cos[pos], self.sin[pos]
        x = self.x
        x.copy_(self.embed[token])
        for layer in self.layers:
            self.lib.layer_step(layer, self.shape, x.data_ptr(), pos, cos.data_ptr(), sin.data_ptr(), mode)
            if active is not None:
                active.append({site: self.index[slot][: self.shape.count[slot]].clone()
                               for slot, site in enumerate(SITES) if site in self.sites})
        h = x * torch.rsqrt(x.pow(2).mean() + self.shape.eps) * self.norm
        return self.lm_head(h)


@dataclass(frozen=True)
class Check:
    """The C steps against PyTorch's forward over the same tokens (``check``)."""

    dense_logit_diff: float  # max |C dense - PyTorch| over the last logits, of their scale
    masked_logit_diff: float  # the same, sparse C step against PyTorch masked with the C steps' masks
    mask_flips: int  # values whose C mask differs from thresholding PyTorch's own values
    values_checked: int
    nearest_flip: float  # the largest relative distance from its threshold of a flipped value


def check(model: nn.Module, decoder: CompiledDecoder, thresholds: Mapping[Key, torch.Tensor | float],
          tokens: torch.Tensor) -> Check:
    """The C steps' last logits against PyTorch's forward over ``tokens``: dense, and masked with
    the channels the C steps kept; raises if either differs beyond float rounding, or if a mask
    differs from thresholding beyond it. A threshold is a step function: where the two compute its
    input in another order (RMSNorm, attention), a value within rounding of the threshold is kept
    on one side only, and on the 1.5B's massive activations those few flips grow through the
    layers (~1e-1 of the logits' scale after 16 tokens). So the masked reference takes the C steps'
    masks, and the channels where they differ from its own thresholding are counted, with how far
    its values lie from the threshold there."""
    for pos, token in enumerate(tokens.tolist()):
        logits = decoder.step(token, pos, DENSE)
    with torch.inference_mode():
        dense_diff = _compare("dense", logits, model(tokens[None]).logits[0, -1])
    masks: list[list[dict]] = []  # [position][layer][site] active channels of the C steps
    for pos, token in enumerate(tokens.tolist()):
        masks.append([])
        logits = decoder.step(token, pos, SPARSE, masks[-1])
    tally = {"flips": 0, "checked": 0, "nearest": 0.0}

    def masked(values: torch.Tensor, number: int, site: str) -> torch.Tensor:
        t = torch.as_tensor(thresholds[(number, site)], dtype=torch.float32)
        kept = torch.zeros_like(values[0])
        for pos in range(values.shape[1]):
            kept[pos, masks[pos][number][site]] = 1
        differ = kept != ((values[0].abs() >= t) & (values[0] != 0)).float()
        tally["flips"] += int(differ.sum())
        tally["checked"] += differ.numel()
        if differ.any():
            distance = ((values[0].abs() - t).abs() / t.expand_as(values[0]))[differ]
            tally["nearest"] = max(tally["nearest"], float(distance.max()))
        return values * kept

    hooks, anatomy = [], anatomy_of(model)
    for number, layer in enumerate(decoder_layers(model, anatomy)):
        for site in decoder.sites:
            for hooked in hook_sites(anatomy, site, decoder.kv_dense):
                module = layer.get_submodule(hooked.path)
                if hooked.is_input:
                    hook = module.register_forward_pre_hook(lambda m, i, n=number, s=site: (masked(i[0], n, s),))
                else:
                    hook = module.register_forward_hook(lambda m, i, out, n=number, s=site: masked(out, n, s))
                hooks.append(hook)
    try:
        with torch.inference_mode():
            expected = model(tokens[None]).logits[0, -1]
    finally:
        for hook in hooks:
            hook.remove()
    result = Check(dense_diff, _compare("thresholded (with the C steps' masks)", logits, expected), tally["flips"],
                   tally["checked"], tally["nearest"])
    log.info("compiled step against PyTorch: dense logits within %.1e, thresholded within %.1e of their scale; %d of "
             "%d values masked otherwise than PyTorch's own thresholding, each within %.1e (relative) of its "
             "threshold", result.dense_logit_diff, result.masked_logit_diff, result.mask_flips, result.values_checked,
             result.nearest_flip)
    if result.nearest_flip > FLIP_DISTANCE:
        raise AssertionError(f"the C steps' masks differ from thresholding by more than rounding: a value "
                             f"{result.nearest_flip:.1e} (relative) from its threshold")
    return result


def _compare(label: str, logits: torch.Tensor, expected: torch.Tensor) -> float:
    diff = float((logits - expected).abs().max()) / float(expected.abs().max())
    if diff > LOGIT_TOLERANCE:
        raise AssertionError(f"the C {label} step computes something else than PyTorch: {diff:.1e} of the logits' "
                             f"scale, argmax {int(logits.argmax())} against {int(expected.argmax())}")
    return diff


def time_steps(decoder: CompiledDecoder, prompt_ids: torch.Tensor, new_tokens: int, repeats: int) -> dict[int, float]:
    """Median seconds of each kind of C step (dense, kernels keeping every channel, sparse),
    rotating step by step after an untimed prompt, as ``kernels.decode_speed``'s sides do. The
    prompt runs once: its cache entries are the same for every repeat, and a step attends only to
    positions up to its own, so each repeat decodes on from it (a 1.5B prompt of 64 tokens is
    ~8 s of C steps)."""
    modes = (DENSE, EVERY, SPARSE)
    seconds: dict[int, list[float]] = {mode: [] for mode in modes}
    for pos, token in enumerate(prompt_ids.tolist()):
        after_prompt = decoder.step(token, pos, DENSE)
    for _ in range(repeats):
        logits = after_prompt
        for i in range(new_tokens):
            mode = modes[i % len(modes)]
            started = time.perf_counter()
            logits = decoder.step(int(logits.argmax()), len(prompt_ids) + i, mode)
            seconds[mode].append(time.perf_counter() - started)
    return {mode: statistics.median(s) for mode, s in seconds.items()}


CHECKED_TOKENS = 16  # the check's forward, as sparse_vs_masked's greedy tokens
COLUMNS = columns.SPEED[columns.SPEED.index("compiled_dense_tps"):]  # what compiled_speed returns


def compiled_speed(model: nn.Module, thresholds: Mapping[Key, torch.Tensor | float], prompt_ids: torch.Tensor,
                   new_tokens: int, repeats: int, kv_dense: bool = False) -> dict[str, float]:
    """Tokens/s of the compiled dense step (the faster of ``DENSE`` and ``EVERY``), of the sparse
    one, its speedup over it, the rate the dense step streamed weights at (as
    ``native_dense_gbps``: low in spells of outside load, when the ratio climbs) and the check's
    masked logit difference; NaN each, logged, where the model is ``unsupported``. The check runs
    first, so no speed is reported for a C step that computes something else."""
    if reason := unsupported(model):
        log.info("no compiled decoding step: %s", reason)
        return dict.fromkeys(COLUMNS, math.nan)
    decoder = CompiledDecoder(model, thresholds, len(prompt_ids) + new_tokens, kv_dense)
    checked = check(model, decoder, thresholds, prompt_ids[:CHECKED_TOKENS])
    seconds = time_steps(decoder, prompt_ids, new_tokens, repeats)
    dense, sparse = 1 / min(seconds[DENSE], seconds[EVERY]), 1 / seconds[SPARSE]
    speed = dense, sparse, sparse / dense, dense * kernels.dense_step_bytes(model) / 1e9, checked.masked_logit_diff
    return dict(zip(COLUMNS, speed))
