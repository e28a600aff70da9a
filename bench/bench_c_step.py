"""How far sparse decoding's speedup goes once the time a dense and a sparse step share outside
the weight reads is nearly gone: a Qwen2/Llama decoder layer written in C (RMSNorm, rotary, KV
cache, attention, residuals) around the library's own products (``dense_matvec``,
``sparse_ffn``, ``sparse_linear``, compiled into the same library), one C call a layer, against
the same model on PyTorch's modules as ``kernels.decode_speed`` times it (bench/RESULTS.md: on
the AMD EPYC VM ~38 ms of a ~170 ms 1.5B step lie outside the products).

Three kinds of C step rotate step by step (as ``decode_speed``'s sides): dense (every product on
the C matvec), the kernels keeping every channel, and the kernels with the thresholds: CATS or
CHESS on ``act`` (the FFN kernel; attention dense), CHESS+ (that and q and o on their inputs), or
TEAL's four inputs (every projection).
Printed: median step times, the sparse step's speedup over the faster dense one, the same model's
``decode_speed`` (PyTorch's modules around the same products) in the same run, and the C steps'
logits against PyTorch's, dense and masked (``check``), which fails the run if they differ.

    .venv/bin/python bench/bench_c_step.py \\
        --model-dir results/models/qwen2.5-coder-1.5b \\
        --thresholds results/thresholds/qwen2.5-coder-1.5b/cats/0.50.safetensors \\
        --corpus results/corpora/qwen2.5-coder-1.5b/evaluation.safetensors
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import torch

from actsparse import corpora, kernels, methods, models, native
from actsparse.anatomy import anatomy_of, decoder_layers
from actsparse.hooks import hook_sites

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

static float silu(float x) { return x / (1.0f + expf(-x)); }

/* y = w x + bias: on the C matvec, or, where the layer has the transposed rows and the step is not
   dense, over the inputs the site's threshold keeps (every nonzero one in EVERY), as the library's
   SparseInputLinear does: 16 parts up to 2048 outputs, else split by output columns */
static void product(const Layer *L, Step *S, int mode, int site, const float *w, const float *rows,
                    const float *bias, const float *x, int64_t in, int64_t out, float *y) {
    if (mode == DENSE || !rows) {
        dense_matvec(w, bias, x, out, in, y, S->threads);
        return;
    }
    int sparse = mode == SPARSE;
    S->count[site] = sparse_linear(x, sparse ? L->threshold[site] : S->zero, sparse ? L->step[site] : 0, in, in, rows,
                                   bias, out, S->index[site], S->active[site], out <= 2048 ? 16 : 0, S->partials, y,
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
    for (int64_t h = 0; h < S->heads; h++) {
        const float *qh = q + h * d, *kc = L->kcache + (h / group) * S->max_len * d;
        const float *vc = L->vcache + (h / group) * S->max_len * d;
        float top = -INFINITY, total = 0, *out = S->attn + h * d;
        for (int64_t t = 0; t <= pos; t++) {
            float s = 0;
            for (int64_t i = 0; i < d; i++) s += qh[i] * kc[t * d + i];
            S->scores[t] = s * scale;
            top = S->scores[t] > top ? S->scores[t] : top;
        }
        for (int64_t t = 0; t <= pos; t++) total += S->scores[t] = expf(S->scores[t] - top);
        memset(out, 0, d * sizeof(float));
        for (int64_t t = 0; t <= pos; t++)
            for (int64_t i = 0; i < d; i++) out[i] += S->scores[t] / total * vc[t * d + i];
    }
    product(L, S, mode, SITE_O_IN, L->wo, L->o_rows, NULL, S->attn, S->heads * d, hidden, S->o);
    for (int64_t i = 0; i < hidden; i++) x[i] += S->o[i];
    rmsnorm(x, L->ln2, hidden, S->eps, S->h);
    if (sparse_ffn_in) product(L, S, mode, SITE_FFN_IN, NULL, L->gate_up_rows, NULL, S->h, hidden, 2 * I, gate);
    else dense_matvec(L->wg, NULL, S->h, I, hidden, gate, S->threads);
    for (int64_t c = 0; c < I; c++) gate[c] = silu(gate[c]);
    if (mode != DENSE && L->blocks) {
        int sparse = mode == SPARSE;
        S->count[SITE_ACT] = sparse_ffn(gate, sparse ? L->threshold[SITE_ACT] : S->zero, sparse ? L->step[SITE_ACT] : 0,
                                        I, I, L->blocks, NULL, NULL, S->h, hidden, S->index[SITE_ACT],
                                        S->active[SITE_ACT], 16, S->partials, S->y, S->threads);
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


class CDecoder:
    """The model's decoder layers as C calls on its own weights (Qwen2 or Llama shapes), reading
    the very layouts and thresholds ``kernels.sparsify_for_decode`` builds for the library's
    kernels: ``act``'s FFN blocks (CATS, CHESS), and for a thresholded input the stacked,
    transposed weights of the projections it feeds (TEAL; CHESS+'s ``attn_in`` with
    ``kv_dense``: q alone). Bad thresholds fail there, by name."""

    def __init__(self, model, thresholds: dict, max_len: int, kv_dense: bool = False) -> None:
        self.lib = native.load("c decoding step", kernels._NATIVE_SOURCE + _LAYER_SOURCE, ("-fopenmp",))
        self.lib.layer_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self.sites = tuple(site for site in SITES if any(component == site for _, component in thresholds))
        self.kv_dense = kv_dense
        config = model.config
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        d, inter = getattr(config, "head_dim", None) or hidden // heads, config.intermediate_size
        qkv, inputs = (heads + 2 * kv_heads) * d, max(hidden, heads * d, inter)
        self.keep: list[torch.Tensor] = []  # every buffer the C side points into
        scratch = [self._buffer(size) for size in (hidden, qkv, heads * d, hidden, 2 * inter, hidden, max_len,
                                                   16 * max(hidden, qkv, 2 * inter), 1)]
        self.index = [self._keep(torch.empty(inputs, dtype=torch.int64)) for _ in SITES]
        self.shape = Step(hidden, heads, kv_heads, d, inter, max_len, config.rms_norm_eps, torch.get_num_threads(),
                          *scratch, (ctypes.c_void_p * len(SITES))(*(self._buffer(inputs) for _ in SITES)),
                          (ctypes.c_void_p * len(SITES))(*(i.data_ptr() for i in self.index)))
        with kernels.sparsify_for_decode(model, thresholds, kernel="native", kv_dense=kv_dense) as handle:
            self.layers = [self._layer(layer, kv_heads * max_len * d) for layer in decoder_layers(model)]
        self.kernels = handle  # holds the layouts the layers point into
        self.embed, self.norm = model.get_input_embeddings().weight, model.model.norm.weight
        self.lm_head = kernels.dense_product(model.lm_head.weight, None)
        self.rotary, self.x = model.model.rotary_emb, torch.empty(hidden)

    def _layer(self, layer, cache_size: int) -> Layer:
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
        """The logits after ``token`` at position ``pos``, the products read as ``mode`` says.
        ``active``, if given, gets each layer's active channels per thresholded site."""
        cos, sin = (t[0, 0].contiguous() for t in self.rotary(self.x[None, None], torch.tensor([[pos]])))
        x = self.x
        x.copy_(self.embed[token])
        for layer in self.layers:
            self.lib.layer_step(ctypes.addressof(layer), ctypes.addressof(self.shape), x.data_ptr(), pos,
                                cos.data_ptr(), sin.data_ptr(), mode)
            if active is not None:
                active.append({site: self.index[slot][: self.shape.count[slot]].clone()
                               for slot, site in enumerate(SITES) if site in self.sites})
        h = x * torch.rsqrt(x.pow(2).mean() + self.shape.eps) * self.norm
        return self.lm_head(h)


def check(model, decoder: CDecoder, thresholds: dict, tokens: torch.Tensor) -> None:
    """The C steps' last logits against PyTorch's forward over the same tokens: dense, and masked
    with the channels the C steps kept. A threshold is a step function: where the two compute its
    input in another order (RMSNorm, attention), a value within rounding of the threshold is kept
    on one side only, and on the 1.5B's massive activations those few flips grow through the
    layers (~1e-1 of the logits' scale after 16 tokens). So the masked reference takes the C steps'
    masks, and the channels where they differ from its own thresholding are counted, with how far
    its values lie from the threshold there."""
    for pos, token in enumerate(tokens.tolist()):
        logits = decoder.step(token, pos, DENSE)
    with torch.inference_mode():
        _compare("dense", logits, model(tokens[None]).logits[0, -1])
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
    for number, layer in enumerate(decoder_layers(model)):
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
    _compare("thresholded (the C steps' masks)", logits, expected)
    print(f"  values whose C mask differs from thresholding PyTorch's own: {tally['flips']} of {tally['checked']}, "
          f"each within {tally['nearest']:.1e} of the threshold (relative)", flush=True)
    if tally["nearest"] > FLIP_DISTANCE:
        raise AssertionError(f"the C steps' masks differ from thresholding by more than rounding: a value "
                             f"{tally['nearest']:.1e} (relative) from its threshold")


def _compare(label: str, logits: torch.Tensor, expected: torch.Tensor) -> None:
    diff = float((logits - expected).abs().max()) / float(expected.abs().max())
    print(f"C {label} step against PyTorch: max |logit diff| {diff:.1e} of scale, "
          f"argmax {'equal' if logits.argmax() == expected.argmax() else 'DIFFERENT'}", flush=True)
    if diff > LOGIT_TOLERANCE:
        raise AssertionError(f"the C {label} step computes something else than PyTorch: {diff:.1e} of the logits' scale")


def time_c_steps(decoder: CDecoder, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[int, float]:
    """Median seconds of each kind of C step (dense, kernels keeping every channel, sparse),
    rotating step by step after an untimed prompt."""
    modes = (DENSE, EVERY, SPARSE)
    seconds: dict[int, list[float]] = {mode: [] for mode in modes}
    for _ in range(repeats):
        for pos, token in enumerate(prompt.tolist()):
            logits = decoder.step(token, pos, DENSE)
        for i in range(new_tokens):
            mode = modes[i % len(modes)]
            started = time.perf_counter()
            logits = decoder.step(int(logits.argmax()), len(prompt) + i, mode)
            seconds[mode].append(time.perf_counter() - started)
    return {mode: statistics.median(s) for mode, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--thresholds", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model, tokenizer = models.load_model(Path(args.model_dir), "cpu", "float32", own_memory=True)
    text = corpora.load_corpus(Path(args.corpus))["input_ids"][: args.prompt_tokens - 1]
    prompt = torch.cat([torch.tensor([models.bos_id(tokenizer)]), text])
    thresholds, metadata = methods.load_thresholds(Path(args.thresholds))
    label = f"{metadata['method']} {metadata.get('target_sparsity', '')}"
    kv_dense = methods.requirements(metadata["method"], gated=anatomy_of(model).gated).kv_dense
    decoder = CDecoder(model, thresholds, len(prompt) + args.new_tokens, kv_dense)
    check(model, decoder, thresholds, prompt[:16])
    c = time_c_steps(decoder, prompt, args.new_tokens, args.repeats)
    dense, every, sparse = c[DENSE], c[EVERY], c[SPARSE]
    print(f"{label}, C steps (ms): dense {1e3 * dense:.1f}, kernels keeping every channel {1e3 * every:.1f}, "
          f"sparse {1e3 * sparse:.1f}: speedup over the faster dense {min(dense, every) / sparse:.3f}", flush=True)
    del decoder  # its layouts, before decode_speed builds its own
    speed = kernels.decode_speed(model, thresholds, prompt, args.new_tokens, args.repeats, kv_dense=kv_dense)
    print(f"{label}, PyTorch's modules (decode_speed, same run): native dense {1e3 / speed['native_dense_tps']:.1f} ms, "
          f"kernel every channel {1e3 / speed['kernel_dense_tps']:.1f}, sparse {1e3 / speed['sparse_tps']:.1f}: "
          f"fair speedup {speed['fair_speedup']:.3f} (bound {speed['bound']:.3f})", flush=True)


if __name__ == "__main__":
    main()
