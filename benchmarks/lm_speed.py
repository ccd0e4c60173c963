"""DPO and reward-model training speed and memory against TRL, on the workload of ../shared/bench (side by side).

The workload is exactly the one of ../shared/bench/trl_dpo.py and trl_reward.py: the tiny random Qwen2 model and the
character tokenizer of tiny_lm.py (saved to a directory in Hugging Face format and loaded from it by path), its 512
synthetic preference pairs (prompt 32 tokens, chosen and rejected 32 tokens each, EOS appended), batch 8, one epoch
(64 optimizer steps), linear learning-rate decay, DPO with the sigmoid loss, beta 0.1 and learning rate 1e-6, the
reward model with the Bradley-Terry loss and learning rate 1e-4, fp32 (or bf16 autocast with --bf16), 2 torch
threads.

With `--model-dir DIR --lora-r R` both sides load a real model directory instead (SmolLM2-135M-Instruct from
`advantage fetch-model smollm2-135m-instruct --out DIR`, the weights ../shared/bench/real_model.py makes) with its own
tokenizer (the 32-character texts are then fewer tokens), and train LoRA adapters of rank R, alpha 2R, on every
linear projection of its blocks (R = 0: full fine-tuning). The FLOP figures then count the tokens each side's
tokenizer made (`tokens_total` from TRL's script; ours from the run's own token count).

Each measurement is a fresh process; ours and TRL's alternate run by run (ours, then TRL, for each stage), so both
see the same machine. Our time is the whole `train()` call: reading the data, tokenizing, loading the model, the
reference log-probabilities (DPO), the 64 steps and writing final/. TRL's is its `trainer.train()` (its reference
model is loaded and its data tokenized before that, outside the timed region): our measure is the stricter one.

Figures per run:
    wall_s            seconds of the timed region
    pairs_per_s       512 / wall_s
    train_phase_pairs_per_s  pairs per second of the phase TRL's timed region covers: ours from the end of loading
                      the model to the start of writing final/ (the reference log-probabilities and the training
                      steps); TRL's is its whole timed region
    trl_tokens_per_s  the tokens TRL runs per pair (prompt twice, chosen + EOS, rejected + EOS) x 512 / wall_s
    model_gflops_per_s  FLOPs of the work actually done / wall_s, counting 6N per token through forward and backward
                      and 2N per token through a forward only (N = parameters; attention scores ignored), as the
                      peer scripts do: TRL's DPO does 8N on prompt + chosen and prompt + rejected; ours does 6N on
                      prompt + chosen + rejected (the prompt once) plus 2N on the same for the reference, once
    peak_rss_mib      peak resident memory of the process
    first_loss, last_loss   training loss at the first and last step (the same learning outcome)

Usage:
    python benchmarks/lm_speed.py --bench-dir ../shared/bench [--peers-python /tmp/peers/bin/python]
        [--runs 3] [--stages dpo,reward] [--threads 2] [--processes 1] [--bf16] [--pairs 512]
        [--model-dir DIR --lora-r 16]
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

TRL_SCRIPTS = {"dpo": "trl_dpo.py", "reward": "trl_reward.py"}


def module_of(stage: str):
    """The stage's module (dpo or reward), whose `load_policy` the benchmark times."""
    import importlib

    return importlib.import_module(f"advantage.lm.{stage}")


def child(stage: str, bench_dir: str, threads: int, pairs: int, bf16: bool, model_dir: str = "",
          lora_r: int = 0) -> dict:
    """Our side of one measurement, in this (fresh) process."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, bench_dir)
    import tiny_lm

    from advantage.lm import dpo, reward
    from advantage.lm.data import write_jsonl

    work = Path(tempfile.mkdtemp(prefix=f"advantage-{stage}-"))
    atexit.register(shutil.rmtree, work, True)  # a run of SmolLM2 leaves ~0.6 GB of checkpoints
    model_dir = model_dir or tiny_lm.build_model_dir(str(work / "model"), seed=0)
    write_jsonl(tiny_lm.preference_pairs(pairs, 32, 32, seed=0), work / "pairs.jsonl")
    extra_lora = {"lora_r": lora_r, "lora_alpha": 2.0 * lora_r} if lora_r else {}
    # The phase TRL's timed region covers (its trainer.train(): reference log-probabilities and training, not the
    # loading of the model nor the final save): from the end of our model loading to the start of writing final/.
    from advantage.lm import session as lm_session

    marks = {}
    loaded, finish = getattr(module_of(stage), "load_policy"), lm_session.LMSession.finish

    def timed_load(*args, **kwargs):
        result = loaded(*args, **kwargs)
        marks["loaded"] = time.perf_counter()
        return result

    def timed_finish(self, *args, **kwargs):
        marks["finishing"] = time.perf_counter()
        return finish(self, *args, **kwargs)

    setattr(module_of(stage), "load_policy", timed_load)
    lm_session.LMSession.finish = timed_finish
    module, learning_rate = (dpo, 1e-6) if stage == "dpo" else (reward, 1e-4)
    extra = {"beta": 0.1, "loss": "sigmoid"} if stage == "dpo" else {"loss": "bt"}
    config = module.CONFIG(model=model_dir, data=str(work / "pairs.jsonl"), batch_size=8, epochs=1,
                           learning_rate=learning_rate, lr_schedule="linear", max_length=128, threads=threads,
                           mixed_precision="bf16" if bf16 else "no", progress=False, tensorboard=False,
                           checkpoint_every=10**9, seed=0, device=os.environ.get("ADVANTAGE_BENCH_DEVICE", "auto"),
                           cuda_graphs=os.environ.get("ADVANTAGE_BENCH_CUDA_GRAPHS", "1") != "0", **extra, **extra_lora)
    began = time.perf_counter()
    run = module.train(config, work / "run")
    wall = time.perf_counter() - began
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:  # torchrun: the memory of every process counts; rank 0 reports
        import torch.distributed as dist

        total = torch.tensor([peak_rss_mib], dtype=torch.float64)
        dist.all_reduce(total)
        peak_rss_mib = float(total)
        dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return {}
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    loss_name = "losses/dpo" if stage == "dpo" else "losses/reward"
    parameters = tiny_lm.n_params(run.model)
    # Tokens of each pair: the prompt once, both answers with their end token (TRL: the prompt twice).
    prompt_tokens, answer_tokens = _pairs_tokens(run, pairs)
    our_tokens, trl_tokens = prompt_tokens + answer_tokens, 2 * prompt_tokens + answer_tokens
    flops = our_tokens * (8 if stage == "dpo" else 6) * parameters
    return {"side": "advantage", "stage": stage, "processes": processes, "threads": torch.get_num_threads(),
            "params": parameters,
            "steps": rows[-1]["step"], "wall_s": round(wall, 3), "pairs_per_s": round(pairs / wall, 2),
            "train_phase_s": round(marks["finishing"] - marks["loaded"], 3),
            "train_phase_pairs_per_s": round(pairs / (marks["finishing"] - marks["loaded"]), 2),
            "trl_tokens_per_s": round(trl_tokens / wall, 1), "model_gflops_per_s": round(flops / wall / 1e9, 1),
            "peak_rss_mib": round(peak_rss_mib, 1),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            "first_loss": rows[0][loss_name], "last_loss": rows[-1][loss_name]}


def _pairs_tokens(run, pairs: int) -> tuple[int, int]:
    """(prompt tokens, answer tokens) of the first `pairs` training pairs as our tokenizer made them."""
    from advantage.lm.data import load_rows
    from advantage.lm.loading import end_ids
    from advantage.lm.preferences import tokenize_rankings

    rows = load_rows(run.config.data, "preference")[:pairs]
    examples = tokenize_rankings(rows, "preference", run.tokenizer, 128, "training", end_ids(run.tokenizer, run.model))
    return (sum(len(e.prompt_ids) for e in examples),
            sum(len(answer) for e in examples for answer in e.completion_ids))


def run_ours(stage: str, args) -> dict:
    threads = max(1, args.threads // args.processes)  # the same cores, split between the processes
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.processes}"] \
        if args.processes > 1 else [sys.executable]
    command = [*launcher, os.path.abspath(__file__), "--child", stage, "--bench-dir", args.bench_dir,
               "--threads", str(threads), "--pairs", str(args.pairs), "--model-dir", args.model_dir, "--lora-r",
               str(args.lora_r)] + (["--bf16"] if args.bf16 else [])
    return last_json_line(command, threads, f"advantage {stage}")


def run_trl(stage: str, args) -> dict:
    script = os.path.join(args.bench_dir, TRL_SCRIPTS[stage])
    command = [args.peers_python, script, "--runs", "1", "--threads", str(args.threads), "--pairs", str(args.pairs)]
    if args.model_dir:  # trl_reward.py takes no model directory: the tiny model only
        command += ["--model-dir", args.model_dir, "--lora-r", str(args.lora_r)]
    result = last_json_line(command, args.threads, f"TRL {stage}", {"ANCHOR_BF16": "1" if args.bf16 else "0"})
    one = result["runs"][0]
    parameters = one["params"]
    trl_tokens = one["tokens_total"]
    flops = trl_tokens * (8 if stage == "dpo" else 6) * parameters
    logs = {"first_loss": one.get("first_loss"), "last_loss": one.get("last_loss")}
    return {"side": "TRL", "stage": stage, "threads": one["torch_threads"], "params": parameters,
            "steps": one["steps"], "wall_s": one["train_wall_s"], "pairs_per_s": one["samples_per_s"],
            "trl_tokens_per_s": one["tokens_per_s"], "model_gflops_per_s": round(flops / one["train_wall_s"] / 1e9, 1),
            "train_phase_s": one["train_wall_s"], "train_phase_pairs_per_s": one["samples_per_s"],
            "peak_rss_mib": one["peak_rss_mib"], **logs}


def last_json_line(command: list[str], threads: int, tag: str, env_extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **(env_extra or {}))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{tag} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"),
                        help="the folder of tiny_lm.py and the TRL scripts")
    parser.add_argument("--peers-python", default="", help="python of the peers' environment (empty: ours only)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stages", default="dpo,reward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (TRL: ANCHOR_BF16=1)")
    parser.add_argument("--processes", type=int, default=1,
                        help="our side under torchrun with this many processes (data parallel, gloo), sharing "
                             "--threads between them; TRL keeps one process with --threads")
    parser.add_argument("--model-dir", default="", help="a Hugging Face model directory (default: tiny_lm's model)")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank, alpha 2R (0: full fine-tuning)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, args.bench_dir, args.threads, args.pairs, args.bf16, args.model_dir, args.lora_r)
        if result:  # rank 0 (or the only process)
            print(json.dumps(result), flush=True)
        return

    results = []
    for index in range(args.runs):
        for stage in args.stages.split(","):
            sides = [run_ours] + ([run_trl] if args.peers_python else [])
            for run in sides:
                result = {"run": index, **run(stage, args)}
                print(json.dumps(result), flush=True)
                results.append(result)

    print("\n| stage | side | pairs/s (runs) | median | training phase pairs/s (median) | model GFLOP/s | "
          "peak RSS MiB | loss first -> last |")
    print("|---|---|---|---|---|---|---|---|")
    medians, phases = {}, {}
    for stage in args.stages.split(","):
        for side in ("advantage", "TRL"):
            rows = [r for r in results if r["stage"] == stage and r["side"] == side]
            if not rows:
                continue
            median = statistics.median(r["pairs_per_s"] for r in rows)
            medians[stage, side] = median
            phases[stage, side] = statistics.median(r["train_phase_pairs_per_s"] for r in rows)
            print(f"| {stage} | {side} | {' / '.join(str(r['pairs_per_s']) for r in rows)} | {median} | "
                  f"{phases[stage, side]} | {statistics.median(r['model_gflops_per_s'] for r in rows)} | "
                  f"{max(r['peak_rss_mib'] for r in rows)} | "
                  f"{rows[0]['first_loss']:.4f} -> {statistics.median(r['last_loss'] for r in rows):.4f} |")
    for stage in args.stages.split(","):
        if (stage, "TRL") in medians:
            print(f"{stage}: advantage / TRL = {medians[stage, 'advantage'] / medians[stage, 'TRL']:.2f}x (ours "
                  f"timed from the start of train(), load and final save included); "
                  f"{phases[stage, 'advantage'] / phases[stage, 'TRL']:.2f}x over the same phase as TRL's "
                  f"trainer.train()")


if __name__ == "__main__":
    main()
