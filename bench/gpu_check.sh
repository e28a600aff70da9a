#!/usr/bin/env bash
# The GPU checks of storeless calibration, in one run on a CUDA machine: the CUDA tests, then
# SmolLM2-135M's storeless cats and chess fits (bench/gpu_check.yaml, 64k calibration tokens) on
# the GPU and on the CPU, each timed, and their thresholds compared (float32 models on both;
# the GPU's matmuls round differently, so the script prints the largest relative difference
# instead of asking for equal bits).
#   bash bench/gpu_check.sh [CALIBRATION_TOKENS]    # after `make install`
# It runs the workflow in gpu-check/work (results/ is left alone) and keeps both devices'
# thresholds in gpu-check/{cuda,cpu}.
set -euo pipefail
tokens=${1:-65536}
bin=.venv/bin
targets=(results/thresholds/smollm2-135m/{cats,chess}/0.50.safetensors)
"$bin/python" -c 'import torch; print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
"$bin/pytest" -q tests/test_stats.py tests/test_storeless.py
mkdir -p gpu-check/work
ln -sfn "$PWD/resources" gpu-check/work/resources
printf 'corpora:\n  calibration:\n    path: resources/data/wikitext-2-raw/wiki.valid.raw.gz\n    max_tokens: %d\n' \
    "$tokens" > gpu-check/tokens.yaml
for device in cuda cpu; do
    start=$(date +%s)
    "$bin/snakemake" --workflow-profile config/profiles/default --directory gpu-check/work --cores all --resources gpu=1 \
        --configfile "$PWD/bench/gpu_check.yaml" "$PWD/gpu-check/tokens.yaml" --config device="$device" \
        --forcerun collect_activations fit_thresholds -- "${targets[@]}"
    echo "$device: storeless collect + fits of cats and chess, $tokens tokens: $(( $(date +%s) - start )) s wall"
    rm -rf "gpu-check/$device" && cp -r gpu-check/work/results/thresholds/smollm2-135m "gpu-check/$device"
done
"$bin/python" - <<'PY'
from safetensors.numpy import load_file
for method in ("cats", "chess"):
    gpu, cpu = (load_file(f"gpu-check/{device}/{method}/0.50.safetensors") for device in ("cuda", "cpu"))
    worst = max(float(abs(gpu[n].astype(float) - cpu[n]).max() / max(abs(cpu[n].astype(float)).max(), 1e-30)) for n in cpu)
    same = all((gpu[name] == cpu[name]).all() for name in cpu)
    print(f"{method}: {len(cpu)} tensors, identical bits: {same}, largest relative difference {worst:.2e}")
PY
