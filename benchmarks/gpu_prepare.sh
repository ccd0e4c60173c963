#!/usr/bin/env bash
# Prepares, on a CPU machine, everything the GPU check (benchmarks/gpu_check.py, issue 15) needs on a lent GPU machine
# that has no package index and takes at most 64 MiB of files a call. Run from the repository root:
#
#     bash benchmarks/gpu_prepare.sh
#
# It fills the ignored folder .gpu/ with
#   whl/     the pure-Python wheels the GPU image lacks (for its Python 3.12): trl, datasets and the two it needs that
#            the image lacks (dill, multiprocess), gymnasium (+ farama-notifications), gguf;
#   bench/   the peers' TRL scripts from ../shared/bench (they live outside the checkout, which alone travels);
#   part1/, part2/  the real model (SmolLM2-135M-Instruct, the 98 MB GGUF file the demo converts) cut in two halves,
#            each small enough for one call.
# and prints the calls to make there, back to back (a machine stays warm about 30 s between calls; one call runs
# at most 10 minutes, so the check is cut in two, and the first call also runs the part that needs no model):
#   1. carry .gpu/part1, .gpu/whl:               bash benchmarks/gpu_device.sh part --only classic
#   2. carry .gpu/part2, .gpu/whl, .gpu/bench:   bash benchmarks/gpu_device.sh check --only stages,two,speed --runs 1
#   3. if device time is left, the same carry:   bash benchmarks/gpu_device.sh check --only speed --runs 1
# When a later call finds the first half gone (the machine was given back between the calls), the check runs on
# the built-in tiny model instead and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=.gpu
python=.venv/bin/python
[ -x "$python" ] || python=python3

rm -rf "$stage.partial"
mkdir -p "$stage.partial/whl" "$stage.partial/bench"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$stage.partial/whl" trl datasets dill multiprocess gymnasium farama-notifications gguf
cp ../shared/bench/{anchor_common,tiny_lm,trl_common,trl_grpo,trl_dpo}.py "$stage.partial/bench/"

# The GGUF file: fetched (and converted) once by `advantage fetch-model`, which keeps the download in its cache.
gguf=$(ls "$HOME"/.cache/advantage/gguf/*.gguf 2>/dev/null | head -1 || true)
if [ -z "$gguf" ]; then
    "$python" -m advantage.cli fetch-model SmolLM2-135M-Instruct > /dev/null
    gguf=$(ls "$HOME"/.cache/advantage/gguf/*.gguf | head -1)
fi
size=$(stat -c %s "$gguf")
half=$(( (size + 1) / 2 ))
mkdir -p "$stage.partial/part1" "$stage.partial/part2"
head -c "$half" "$gguf" > "$stage.partial/part1/model.gguf.1"
tail -c +"$(( half + 1 ))" "$gguf" > "$stage.partial/part2/model.gguf.2"
sha256sum "$gguf" | cut -d' ' -f1 > "$stage.partial/part2/model.gguf.sha256"

rm -rf "$stage"
mv "$stage.partial" "$stage"
du -sh "$stage"/* | sed 's/^/  /'
cat <<TXT
Ready. On the lent machine, calls back to back (the tool's run with timeout_s 600; each sends the checkout and
what it carries; each check stops itself after 540 s and brings back results.json and log.txt):
  1. carry [".gpu/part1", ".gpu/whl"]               bash benchmarks/gpu_device.sh part --only classic
  2. carry [".gpu/part2", ".gpu/whl", ".gpu/bench"]  bash benchmarks/gpu_device.sh check --only stages,two,speed --runs 1
  3. if device time is left, the same carry          bash benchmarks/gpu_device.sh check --only speed --runs 1
Then copy the tables they print into benchmarks/README.md with the date and the GPU.
TXT
