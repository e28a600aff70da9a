#!/usr/bin/env bash
# Every GPU check the issues ask for, in one run on a lent CUDA machine; record what it prints in
# bench/RESULTS.md with the machine.
#   tests      the CUDA tests (tests/test_stats.py, tests/test_storeless.py)
#   storeless  cats and chess fits from live forwards (no stores) of a SmolLM2-135M-shaped model on
#              the GPU and on the CPU (bench/gpu_check.yaml), each timed, their thresholds compared
#              (float32 on both; the GPU's matmuls round differently, so the largest relative
#              difference is printed instead of asking for equal bits)
#   scale      the scale config's calibration and perplexity jobs at 0.5 on a Qwen2.5-Coder-1.5B-
#              shaped model with --resources gpu=1: each job's GPU slot and wall time from its log,
#              its device from its result's provenance
#   decode     dense against sparse decoding on the GPU, the PyTorch kernel (bench_decode.py)
# The machine has no network and takes ~64 MiB beside the checkout, so real weights cannot travel:
# the models are the real ones' configs and tokenizers with random weights (bench/random_model.py),
# all these checks need. Ready it here with bench/gpu_prepare.sh, then in one device call:
#   command: bash bench/gpu_check.sh [STEP ...]      carry: [".whl", "gpu-check/seed.tar.gz"]
# Steps default to all four, in that order; name some to rerun only those. Where .venv exists
# (this machine) it runs in it instead, e.g. `GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh scale`
# rehearses the scale step on the CPU. Work goes to gpu-check/ (results/ is left alone).
set -uo pipefail
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests storeless scale decode)
device=${GPU_CHECK_DEVICE:-cuda}
tokens=${GPU_CHECK_TOKENS:-32768}  # storeless calibration tokens
repo=$PWD
if [ -x .venv/bin/python ]; then
    py=$repo/.venv/bin/python
else  # the image's python3 with the wheels bench/gpu_prepare.sh fetched
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
    export PYTHONPATH=/tmp/site:$repo
    py=python3
fi
snakemake=("$py" -m snakemake --workflow-profile "$repo/config/profiles/default" --cores all --scheduler greedy)
[ "$device" = cpu ] || snakemake+=(--resources gpu=1)
"$py" -c 'import torch; print("torch", torch.__version__, "cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
mkdir -p gpu-check/models
[ -d gpu-check/seed ] || { mkdir -p gpu-check/seed && tar -xzf gpu-check/seed.tar.gz -C gpu-check/seed; } || exit

model() {  # gpu-check/models/$1: the real model's shapes and tokenizer, random weights
    [ -d "gpu-check/models/$1" ] || "$py" bench/random_model.py "gpu-check/seed/$1" "gpu-check/models/$1" --device "$device"
}

workdir() {  # gpu-check/$1: a fresh workflow directory seeing the repository's resources
    rm -rf "gpu-check/$1" && mkdir -p "gpu-check/$1" && ln -s "$repo/resources" "gpu-check/$1/resources"
}

timed() {  # runs "$@", then prints its wall time and status under the step's name
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "== $name: exit $?, $((SECONDS - start)) s wall"
}

step_tests() {
    "$py" -m pytest -q -p no:cacheprovider tests/test_stats.py tests/test_storeless.py
}

step_storeless() {
    model smollm2-135m || return
    local targets=(results/thresholds/smollm2-135m/{cats,chess}/0.50.safetensors)
    printf 'models:\n  smollm2-135m: {local: %s}\ncorpora:\n  calibration:\n    max_tokens: %d\n' \
        "$repo/gpu-check/models/smollm2-135m" "$tokens" > gpu-check/storeless.yaml
    workdir storeless-work
    local on
    for on in "$device" cpu; do
        timed "storeless collect + fits of cats and chess on $on, $tokens tokens" "${snakemake[@]}" \
            --directory gpu-check/storeless-work --configfile "$repo/bench/gpu_check.yaml" "$repo/gpu-check/storeless.yaml" \
            --config device="$on" --forcerun collect_activations fit_thresholds -- "${targets[@]}" || return
        rm -rf "gpu-check/storeless-$on" && cp -r gpu-check/storeless-work/results/thresholds/smollm2-135m "gpu-check/storeless-$on"
    done
    "$py" - "$device" <<'PY'
import sys
from safetensors.numpy import load_file
for method in ("cats", "chess"):
    gpu, cpu = (load_file(f"gpu-check/storeless-{on}/{method}/0.50.safetensors") for on in (sys.argv[1], "cpu"))
    worst = max(float(abs(gpu[n].astype(float) - cpu[n]).max() / max(abs(cpu[n].astype(float)).max(), 1e-30)) for n in cpu)
    same = all((gpu[name] == cpu[name]).all() for name in cpu)
    print(f"{method}: {len(cpu)} tensors, identical bits: {same}, largest relative difference {worst:.2e}")
PY
}

step_scale() {
    model qwen2.5-coder-1.5b || return
    # config/scale.yaml with the random model in place of the real one (same name: the paths
    # below are the scale run's) and the device to check
    "$py" - "$repo/gpu-check/models/qwen2.5-coder-1.5b" "$device" > gpu-check/scale.yaml <<'PY' || return
import sys, yaml
config = yaml.safe_load(open("config/scale.yaml"))
config["models"] = {"qwen2.5-coder-1.5b": {"local": sys.argv[1]}}
config["device"] = sys.argv[2]
print(yaml.safe_dump(config, sort_keys=False))
PY
    workdir scale-work
    local methods=(layer cats chess chess+ teal) targets=(results/eval/ppl/qwen2.5-coder-1.5b/dense/0.00.json)
    local method
    for method in "${methods[@]}"; do targets+=("results/eval/ppl/qwen2.5-coder-1.5b/$method/0.50.json"); done
    timed "scale config, calibration and perplexity at 0.5 on $device" "${snakemake[@]}" \
        --directory gpu-check/scale-work --configfile "$repo/gpu-check/scale.yaml" -- "${targets[@]}" || return
    "$py" - <<'PY'
import json, re
from pathlib import Path
work = Path("gpu-check/scale-work/results")
logs = work / "logs"
for log in sorted([*logs.glob("*/qwen2.5-coder-1.5b.log"), *logs.glob("*/qwen2.5-coder-1.5b/**/*.log")]):
    text = log.read_text()
    slot = re.search(r"holding GPU slot (\d+) of (\d+)", text)
    wall = re.search(r"wall time ([\d.]+) s", text)
    print(f"{log.relative_to(logs)}: slot {slot.group(1) + ' of ' + slot.group(2) if slot else '-'}, "
          f"wall {wall.group(1) if wall else '?'} s")
for result in sorted((work / "eval/ppl").glob("*/*/*.json")):
    row = json.loads(result.read_text())
    print(f"{result.relative_to(work)}: device {row['provenance']['device']}, ppl {row['ppl']:.2f}")
PY
}

step_decode() {
    model qwen2.5-coder-1.5b || return
    "$py" bench/bench_decode.py --device "$device" --model-dir gpu-check/models/qwen2.5-coder-1.5b \
        --methods cats,teal --sparsities 0.5 --no-layer-7b --threads 4 --new-tokens 64 --repeats 3
}

for step in "${steps[@]}"; do
    case $step in
        tests | storeless | scale | decode) timed "$step" "step_$step" ;;
        *) echo "unknown step $step; choose from tests storeless scale decode" >&2; exit 2 ;;
    esac
done
