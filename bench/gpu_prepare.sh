#!/usr/bin/env bash
# Readies bench/gpu_check.sh for a lent GPU machine, here, where PyPI is reachable. That machine
# has no network and takes at most 64 MiB beside the checkout; its image holds Python 3.12 with
# torch, transformers, numpy, pandas, h5py, matplotlib, pytest and more, but not Snakemake, zarr,
# gguf or datasets. This writes (both ignored by git):
#   .whl/                   wheels (CPython 3.12, x86-64) of the pinned packages the image lacks or
#                           holds in another version the pipeline depends on (transformers, its hub)
#   gpu-check/seed.tar.gz   config and tokenizer files of SmolLM2-135M and Qwen2.5-Coder-1.5B (no
#                           weights: the check draws random ones of their shapes, bench/random_model.py)
# The models must have been imported here first (`make run`; `make scale`, or `make install-qwen`
# and the scale config's import_model job). Then, in one device call:
#   command: bash bench/gpu_check.sh      carry: [".whl", "gpu-check/seed.tar.gz"]
set -euo pipefail
# The image lacks these (requirements.txt's pins and, without their own pins, the versions pip
# resolved for them there; the SLURM executor plugins are left out: the check runs locally).
# PuLP (16 MB) is left out too: the check schedules greedily (--scheduler greedy).
missing=(
    snakemake==9.27.1 snakemake-interface-common==1.23.0 snakemake-interface-executor-plugins==9.4.0
    snakemake-interface-logger-plugins==2.1.0 snakemake-interface-report-plugins==1.3.0
    snakemake-interface-scheduler-plugins==2.0.2 snakemake-interface-storage-plugins==4.4.1
    argparse-dataclass==2.0.0 conda-inject==1.3.2 ConfigArgParse==1.9.0 docutils==0.22.4 dpath==2.2.0
    fastjsonschema==2.22.3 gitdb==4.0.12 GitPython==3.2.1 humanfriendly==10.0 immutables==0.21
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
    jupyter_core==5.9.1 nbformat==5.11.1 platformdirs==4.14.9 traitlets==5.16.1 smart_open==7.7.1
    smmap==5.0.3 throttler==1.2.3 yte==1.9.4 tenacity==9.2.1 SQLAlchemy==2.0.59 sqlmodel==0.0.37 greenlet==3.5.6
    pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
    gguf==0.19.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    transformers==5.23.0 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5
)
sdist_only=(connection_pool==0.0.3)  # no wheel on PyPI: built here (pure Python)
pip=(python3 -m pip)
rm -rf .whl && mkdir .whl
"${pip[@]}" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${missing[@]}"
"${pip[@]}" wheel --quiet --no-deps -w .whl "${sdist_only[@]}"
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
