#!/usr/bin/env bash
# What the calls on a lent GPU machine run (issue 15; benchmarks/gpu_prepare.sh makes what they carry and says how
# to call them). From the repository root there:
#
#     bash benchmarks/gpu_device.sh part [gpu_check flags]    # keeps the real model's first half (carry .gpu/part1),
#                                                             # then, given flags, runs `check` with them
#     bash benchmarks/gpu_device.sh check [gpu_check flags]   # carry .gpu/part2, .gpu/whl, .gpu/bench
#
# `check` installs the carried wheels beside the image's packages, joins the two halves of the GGUF file (checked
# against its SHA-256), converts it once into a Hugging Face directory and runs benchmarks/gpu_check.py on it (on
# builtin:tiny, said in the output, when the first half is not there). Its results.json and log come back in $OUT.
set -uo pipefail
script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$script")/.."
# Outside the checkout, so that it outlasts the call while the machine stays warm.
keep=/tmp/advantage-gpu
mkdir -p "$keep"

case "${1:-}" in
part)
    cp .gpu/part1/model.gguf.1 "$keep/" && echo "the model's first half is in $keep ($(du -h "$keep/model.gguf.1" | cut -f1))"
    shift
    # The rest of the call is not wasted: a part of the check that needs no model (--only classic) runs now.
    if [ $# -gt 0 ]; then exec bash "$script" check "$@"; fi
    ;;
check)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    model="$keep/smollm2-135m-instruct"
    if [ ! -f "$model/config.json" ] && [ -f "$keep/model.gguf.1" ] && [ -f .gpu/part2/model.gguf.2 ]; then
        cat "$keep/model.gguf.1" .gpu/part2/model.gguf.2 > "$keep/model.gguf"
        if [ "$(sha256sum "$keep/model.gguf" | cut -d' ' -f1)" = "$(cat .gpu/part2/model.gguf.sha256)" ]; then
            python3 -m advantage.cli fetch-model "$keep/model.gguf" --out "$model" > /dev/null
        else
            echo "the joined GGUF file does not match its SHA-256"
        fi
    fi
    if [ -f "$model/config.json" ]; then
        model_flag="$model"
    else
        echo "the real model is not here (its first half did not outlast the last call): the check runs on builtin:tiny"
        model_flag=builtin:tiny
    fi
    python3 - <<'PY'
from importlib import metadata
names = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "gymnasium", "pyarrow", "gguf")
versions = []
for name in names:
    try:
        versions.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        versions.append(f"{name} missing")
print(", ".join(versions), flush=True)
PY
    out="${OUT:-/tmp/gpu_check_out}"
    mkdir -p "$out"
    # The run directories stay on the machine (only a few files come back): results.json and the log do. The check
    # stops before the call's 600 s do, so that what it finished (results.json is rewritten after every row) is
    # copied back.
    timeout "${GPU_CHECK_SECONDS:-540}" python3 benchmarks/gpu_check.py --out "$keep/check" --bench-dir .gpu/bench \
        --model "$model_flag" "$@" 2>&1 | tee "$out/log.txt"
    status=${PIPESTATUS[0]}
    cp "$keep/check/results.json" "$out/" 2>/dev/null
    exit "$status"
    ;;
*)
    echo "usage: bash benchmarks/gpu_device.sh part|check [gpu_check.py flags]" >&2
    exit 2
    ;;
esac
