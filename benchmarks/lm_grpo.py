"""GRPO time per step and memory against TRL, on the workload of ../shared/bench/trl_grpo.py (side by side).

The workload: the tiny random Qwen2 model and character tokenizer of tiny_lm.py (saved to a directory and loaded by
path), its 64 prompts of 32 tokens, 8 prompts per step with G = 8 completions each (64 completions a step) of exactly
32 tokens (EOS held back until then: `--min-new-tokens 32`, TRL's `min_new_tokens`), the reward tiny_lm.count_a_reward
(the share of 'a' characters), 8 steps, learning rate 1e-6 decaying linearly, clip 0.2, one iteration per batch,
token-level loss (TRL's "dapo": every completion token of the batch alike), beta 0 (no reference model; --beta 0.04
loads one), temperature 1, fp32, 2 torch threads.

With `--model-dir DIR --lora-r R` both sides load a real model directory instead (for example SmolLM2-135M-Instruct
from `advantage fetch-model smollm2-135m-instruct --out DIR`, the same weights as ../shared/bench/real_model.py
makes for the peers) with its own tokenizer, and train LoRA adapters of rank R (alpha 2R) on every linear projection
of its blocks (R = 0: full fine-tuning); the prompts are the same 32 characters (fewer tokens with a real tokenizer),
the completions still exactly 32 tokens.

Each measurement is a fresh process; ours and TRL's alternate run by run. Per step, ours reports the seconds of its
sampling (time/generation_s) and of the rest (rewards, log-probabilities, forward, backward, optimizer:
time/training_s); TRL's script reports the same split from its profiling contexts. The step's total is their sum;
the table shows medians over the 8 steps of each run, then the median over runs.

Usage:
    python benchmarks/lm_grpo.py --bench-dir ../shared/bench [--peers-python /tmp/peers/bin/python] [--runs 3]
        [--beta 0.0] [--threads 2] [--model-dir DIR --lora-r 16 --steps 4]
Prints one JSON line per run and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def count_a(prompts, completions):
    """tiny_lm.count_a_reward in our reward-function signature: the share of 'a' characters of each completion."""
    return [completion.count("a") / max(len(completion), 1) for completion in completions]


def child(bench_dir: str, threads: int, beta: float, model_dir: str = "", lora_r: int = 0, steps: int = 8,
          accumulation: int = 1, checkpointing: bool = False) -> dict:
    """Our side of one measurement, in this (fresh) process."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, bench_dir)
    import tiny_lm

    from advantage.lm import grpo
    from advantage.lm.data import write_jsonl

    work = Path(tempfile.mkdtemp(prefix="advantage-grpo-"))
    atexit.register(shutil.rmtree, work, True)  # a run of SmolLM2 leaves ~0.6 GB of checkpoints
    model_dir = model_dir or tiny_lm.build_model_dir(str(work / "model"), seed=0)
    write_jsonl(tiny_lm.prompts(64, 32, seed=0), work / "prompts.jsonl")
    config = grpo.CONFIG(model=model_dir, data=str(work / "prompts.jsonl"), batch_size=8, group_size=8,
                         max_new_tokens=32, min_new_tokens=32, max_steps=steps, learning_rate=1e-6,
                         lora_r=lora_r, lora_alpha=2.0 * lora_r if lora_r else 16.0,
                         gradient_accumulation_steps=accumulation, gradient_checkpointing=checkpointing,
                         lr_schedule="linear", clip_range=0.2, num_iterations=1, aggregation="token", beta=beta,
                         temperature=1.0, reward_functions=f"{os.path.abspath(__file__)}:count_a",
                         max_length=128, threads=threads, progress=False, tensorboard=False,
                         checkpoint_every=10**9, seed=0, device=os.environ.get("ADVANTAGE_BENCH_DEVICE", "auto"),
                         cuda_graphs=os.environ.get("ADVANTAGE_BENCH_CUDA_GRAPHS", "1") != "0")
    began = time.perf_counter()
    run = grpo.train(config, work / "run")
    wall = time.perf_counter() - began
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "time/generation_s" in row]
    generation = [row["time/generation_s"] for row in steps]
    training = [row["time/training_s"] for row in steps]
    return {"side": "advantage", "threads": torch.get_num_threads(), "steps": len(steps), "wall_s": round(wall, 3),
            "median_step_s": round(statistics.median(g + t for g, t in zip(generation, training)), 4),
            "median_generate_s": round(statistics.median(generation), 4),
            "median_train_s": round(statistics.median(training), 4),
            "generated_tokens_per_s": round(64 * 32 * len(steps) / sum(generation), 1),
            "time_s": [[round(g, 2), round(t, 2)] for g, t in zip(generation, training)],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            "completion_mean_length": statistics.mean(row["completions/mean_length"] for row in steps),
            "rewards": [round(row["rewards/mean"], 4) for row in steps]}


def last_json_line(command: list[str], threads: int, tag: str) -> dict:
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                       TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        raise SystemExit(f"{tag} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_ours(args) -> dict:
    return last_json_line([sys.executable, os.path.abspath(__file__), "--child", "--bench-dir", args.bench_dir,
                           "--threads", str(args.threads), "--beta", str(args.beta), "--model-dir", args.model_dir,
                           "--lora-r", str(args.lora_r), "--steps", str(args.steps), "--accumulation",
                           str(args.accumulation)] + (["--checkpointing"] if args.checkpointing else []),
                          args.threads, "advantage grpo")


def run_trl(args) -> dict:
    script = os.path.join(args.bench_dir, "trl_grpo.py")
    result = last_json_line([args.peers_python, script, "--runs", "1", "--threads", str(args.threads), "--beta",
                             str(args.beta), "--model-dir", args.model_dir, "--lora-r", str(args.lora_r), "--steps",
                             str(args.steps)], args.threads, "TRL grpo")
    one = result["runs"][0]
    return {"side": "TRL", "threads": one["torch_threads"], "steps": one["steps"], "wall_s": one["train_wall_s"],
            "median_step_s": one["median_step_s"], "median_generate_s": one["median_generate_s"],
            "median_train_s": one["median_train_s"], "generated_tokens_per_s": one["generated_tokens_per_s"],
            "peak_rss_mib": one["peak_rss_mib"], "completion_mean_length": one["completion_mean_length"],
            "rewards": one["rewards"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--peers-python", default="", help="python of the peers' environment (empty: ours only)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--model-dir", default="", help="a Hugging Face model directory (default: tiny_lm's model)")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank, alpha 2R (0: full fine-tuning)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--accumulation", type=int, default=1,
                        help="our side: micro-batches per step (memory only: the same result)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="our side: gradient checkpointing (TRL's GRPO default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.bench_dir, args.threads, args.beta, args.model_dir, args.lora_r, args.steps,
                               args.accumulation, args.checkpointing)), flush=True)
        return
    results = []
    for index in range(args.runs):
        for run in [run_ours] + ([run_trl] if args.peers_python else []):
            result = {"run": index, **run(args)}
            print(json.dumps(result), flush=True)
            results.append(result)
    print(f"\n| side (beta {args.beta}) | s/step (runs) | median s/step | generation s | training s | "
          f"generated tokens/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    medians = {}
    for side in ("advantage", "TRL"):
        rows = [r for r in results if r["side"] == side]
        if not rows:
            continue
        medians[side] = statistics.median(r["median_step_s"] for r in rows)
        print(f"| {side} | {' / '.join(str(r['median_step_s']) for r in rows)} | {medians[side]} | "
              f"{statistics.median(r['median_generate_s'] for r in rows)} | "
              f"{statistics.median(r['median_train_s'] for r in rows)} | "
              f"{statistics.median(r['generated_tokens_per_s'] for r in rows)} | "
              f"{max(r['peak_rss_mib'] for r in rows)} |")
    if "TRL" in medians:
        print(f"time per step advantage / TRL = {medians['advantage'] / medians['TRL']:.2f}")


if __name__ == "__main__":
    main()
