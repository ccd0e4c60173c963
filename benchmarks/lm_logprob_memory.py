"""Peak memory of the log-probabilities of sampled answers with a real vocabulary: chunked head against whole logits.

The workload is one GRPO batch of the speed benchmark (8 prompts of 32 characters with G = 8 answers of 32 tokens,
packed one prompt per row), through `logprobs.answer_log_probs`:

    train      forward and backward (the policy's pass; LoRA r 16 on every projection, or every weight trained)
    no-grad    forward only (the reference's and pi_old's passes, and the reward model's scoring)

each with the head in chunks (`head_log_probs`: at most `LOGITS_CHUNK_ELEMENTS` logits at once) and with the
whole (B, T, V) logits (the model wrapped so that `head_parts` refuses the split: what every pass did before).
Two models: SmolLM2-135M-Instruct (vocabulary 49,152; 30 layers) and a random Qwen2 with Qwen2.5-0.5B's
vocabulary (151,936), hidden size and heads, but 2 layers. Each measurement is a fresh process; its figure is the
peak resident memory during the pass minus the resident memory just before it (model, optimizer-free).

Usage:
    python benchmarks/lm_logprob_memory.py --smollm2 DIR [--threads 2]
Prints one JSON line per measurement and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn


class WholeLogits(nn.Module):
    """The model behind a forward that `head_parts` cannot split: the log-probabilities go through (B, T, V)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


def load(model_name: str, smollm2: str, lora: bool):
    """(model, vocabulary size): SmolLM2 from its directory, or the random Qwen2 with Qwen2.5's vocabulary."""
    from advantage.lm.models import load_causal_lm

    if model_name == "smollm2":
        model, _ = load_causal_lm(smollm2)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                             num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    return model.train(), model.config.vocab_size if not lora else model.get_base_model().config.vocab_size


def child(model_name: str, smollm2: str, mode: str, head: str, threads: int) -> dict:
    """One measurement in this fresh process."""
    from advantage.lm.logprobs import answer_log_probs, collate_shared_prompt

    torch.set_num_threads(threads)
    model, vocabulary = load(model_name, smollm2, lora=mode != "train-full")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, vocabulary, (12,), generator=generator).tolist() for _ in range(8)]
    answers = [[torch.randint(100, vocabulary, (32,), generator=generator).tolist() for _ in range(8)]
               for _ in range(8)]
    batch = collate_shared_prompt(prompts, answers, 0)
    runner = WholeLogits(model) if head == "whole" else model
    before = _current_rss_mib()
    began = time.perf_counter()
    if mode == "no-grad":
        with torch.no_grad():
            answer_log_probs(runner, batch)
    else:
        answer_log_probs(runner, batch).sum().backward()
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": model_name, "vocabulary": vocabulary, "mode": mode, "head": head,
            "answer_tokens": int(batch.answer_mask.sum()), "peak_over_start_mib": round(peak - before, 1),
            "seconds": round(seconds, 2)}


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", required=True, help="SmolLM2-135M-Instruct's directory (advantage fetch-model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "HEAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model_name, mode, head = args.child
        print(json.dumps(child(model_name, args.smollm2, mode, head, args.threads)))
        return
    rows = []
    for model_name in ("smollm2", "qwen2.5-vocabulary"):
        for mode in ("train-lora", "train-full", "no-grad"):
            for head in ("chunked", "whole"):
                environment = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
                done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--smollm2", args.smollm2,
                                       "--threads", str(args.threads), "--child", model_name, mode, head],
                                      capture_output=True, text=True, env=environment)
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-3000:])
                row = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| model (vocabulary) | pass | answer tokens | peak over start, chunked head MiB | whole logits MiB | "
          "seconds chunked / whole |")
    print("|---|---|---|---|---|---|")
    for model_name in ("smollm2", "qwen2.5-vocabulary"):
        for mode in ("train-lora", "train-full", "no-grad"):
            chunked, whole = (next(r for r in rows if r["model"] == model_name and r["mode"] == mode and
                                   r["head"] == head) for head in ("chunked", "whole"))
            print(f"| {model_name} ({chunked['vocabulary']:,}) | {mode} | {chunked['answer_tokens']} | "
                  f"{chunked['peak_over_start_mib']:,.0f} | {whole['peak_over_start_mib']:,.0f} | "
                  f"{chunked['seconds']} / {whole['seconds']} |")


if __name__ == "__main__":
    main()
