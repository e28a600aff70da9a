"""A model directory with a real model's shapes and tokenizer and random weights.

For checks on a machine its weights cannot reach: the GPU machine lent to development sessions
has no network and takes ~64 MiB of files beside the checkout, while the real models' GGUF files
are 98 MB and 1.1 GB. What the GPU checks measure (where jobs run, how long they take, whether the
GPU's thresholds match the CPU's, dense against sparse step time) needs the shapes, not trained
values. ``SEED_DIR`` holds an imported model's ``config.json`` and tokenizer files, no weights
(``bench/gpu_prepare.sh`` packs them); the output loads like any ``local:`` model.

    python bench/random_model.py SEED_DIR OUT_DIR [--device cuda]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def random_model(seed_dir: Path, out_dir: Path, device: str, seed: int = 0) -> None:
    """``out_dir``, written atomically: ``seed_dir``'s files and float32 safetensors weights drawn as
    transformers initialises an untrained model (built on ``device``: a 1.5B model's init takes a
    GPU seconds)."""
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(seed_dir)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    staging = out_dir.with_name(out_dir.name + ".partial")  # a cut-off run leaves no model behind
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(seed_dir, staging)
    model.save_pretrained(staging)
    staging.rename(out_dir)
    print(f"{out_dir}: {config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    random_model(args.seed_dir, args.out_dir, args.device)


if __name__ == "__main__":
    main()
