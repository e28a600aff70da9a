#!/usr/bin/env bash
# Readies bench/gpu_check.sh for a lent GPU machine, here, where PyPI is reachable. That machine
# has no network and takes at most 64 MiB beside the checkout; its image holds Python 3.12 with
# torch, transformers, numpy, pandas, h5py, matplotlib, pytest and more, but not Snakemake, zarr,
# gguf or datasets. This writes (both ignored by git):
#   .whl/                   wheels (CPython 3.12, x86-64) of the pinned packages the image lacks or
#                           holds in another version the pipeline depends on (transformers, its hub)
#   gpu-check/seed.tar.gz   config and tokenizer files of SmolLM2-135M and Qwen2.5-Coder-1.5B (no
#                           weights: the check draws random ones of their shapes, bench/random_model.py)
# .venv and the imported models must exist here first (`make run`; `make scale`, or
# `make install-qwen` and the scale config's import_model job). Then, in one device call:
#   command: bash bench/gpu_check.sh      carry: [".whl", "gpu-check/seed.tar.gz"]
set -euo pipefail
# The image lacks these; each is fetched in the version installed in .venv here (`make install`:
# requirements.txt's pins and what pip resolved for them), so no version is written twice. The
# SLURM executor plugins are left out (the check runs locally), and PuLP (16 MB) too: the check
# schedules greedily (--scheduler greedy).
missing=(
    snakemake snakemake-interface-common snakemake-interface-executor-plugins snakemake-interface-logger-plugins
    snakemake-interface-report-plugins snakemake-interface-scheduler-plugins snakemake-interface-storage-plugins
    argparse-dataclass conda-inject ConfigArgParse docutils dpath fastjsonschema gitdb GitPython humanfriendly
    immutables jsonschema jsonschema-specifications referencing rpds-py jupyter_core nbformat platformdirs
    traitlets smart_open smmap throttler yte tenacity SQLAlchemy sqlmodel greenlet pydantic pydantic_core
    typing-inspection annotated-types
    zarr numcodecs donfig google-crc32c gguf datasets dill multiprocess
    transformers huggingface_hub httpx2 httpcore2 truststore
)
sdist_only=(connection_pool)  # no wheel on PyPI: built here (pure Python)
pinned() {  # name==version of each package as installed in .venv
    .venv/bin/python -c 'import sys; from importlib.metadata import version
print("\n".join(f"{name}=={version(name)}" for name in sys.argv[1:]))' "$@"
}
wheels=($(pinned "${missing[@]}")) built=($(pinned "${sdist_only[@]}"))  # fails here if one is not in .venv
pip=(python3 -m pip)
rm -rf .whl && mkdir .whl
"${pip[@]}" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${wheels[@]}"
"${pip[@]}" wheel --quiet --no-deps -w .whl "${built[@]}"
mkdir -p gpu-check/seed
for model in smollm2-135m qwen2.5-coder-1.5b; do
    source=results/models/$model
    [ -f "$source/config.json" ] || { echo "$source is not imported: run make run (SmolLM2) or make scale (Qwen)" >&2; exit 1; }
    mkdir -p "gpu-check/seed/$model"
    cp "$source"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} "gpu-check/seed/$model/"
done
tar -czf gpu-check/seed.tar.gz -C gpu-check/seed .
rm -rf gpu-check/seed
echo "wheels $(du -sh .whl | cut -f1), seeds $(du -sh gpu-check/seed.tar.gz | cut -f1), checkout $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes"
