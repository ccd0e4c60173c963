"""Sampling speed: our `advantage.lm.generation.generate` against transformers' `model.generate`, same model and batch.

The workload of online RL (GRPO): the tiny random Qwen2 model and character tokenizer of ../shared/bench/tiny_lm.py
(saved to a directory and loaded back with `AutoModelForCausalLM.from_pretrained`), 8 prompts of 32 tokens
(`tiny_lm.prompts`), 8 samples per prompt (64 rows), 32 new tokens, temperature 1, no top-k / top-p, fp32, 2 torch
threads. transformers gets the 8 prompts with `num_return_sequences=8`.

Both sides produce exactly 8 * 8 * 32 tokens: EOS cannot end a row early. transformers is given
`min_new_tokens=max_new_tokens` (its EOS logit is set to -inf until then); ours an EOS id that is no token (-1), so
it is never sampled. The token counts are checked, not assumed.

Measurements alternate, ours then transformers', for each repeat after one warm-up call of each, in one process.
Figures per measurement: seconds of the call and new tokens per second.

Usage:
    python benchmarks/lm_generation.py [--bench-dir /work/shared/bench] [--repeats 3] [--threads 2]
        [--prompts 8] [--prompt-tokens 32] [--samples-per-prompt 8] [--new-tokens 32] [--temperature 1.0]
Prints one JSON line per measurement and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def load_workload(args):
    """The model (eval mode), the pad id and the prompts' token ids, built by tiny_lm."""
    sys.path.insert(0, args.bench_dir)
    import tiny_lm
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="advantage-generation-") as work:  # the weights are in memory after
        model = AutoModelForCausalLM.from_pretrained(tiny_lm.build_model_dir(str(Path(work) / "model"), seed=0)).eval()
    tokenizer = tiny_lm.build_tokenizer()
    texts = [row["prompt"] for row in tiny_lm.prompts(args.prompts, args.prompt_tokens, seed=0)]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    if any(len(prompt) != args.prompt_tokens for prompt in prompts):
        raise SystemExit(f"expected prompts of {args.prompt_tokens} tokens, got {[len(p) for p in prompts]}")
    return model, tokenizer.pad_token_id, prompts


def run_ours(model, prompts, pad_id, args, seed):
    """One call of our generate; returns (seconds, new tokens)."""
    from advantage.lm.generation import generate

    generator = torch.Generator().manual_seed(seed)
    began = time.perf_counter()
    generated = generate(model, prompts, samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.new_tokens,
                         eos_id=-1, pad_id=pad_id, temperature=args.temperature, generator=generator)
    seconds = time.perf_counter() - began
    return seconds, sum(len(completion) for completion in generated.completions)


def run_transformers(model, prompts, pad_id, args, seed):
    """One call of transformers' model.generate; returns (seconds, new tokens)."""
    input_ids = torch.tensor(prompts)
    torch.manual_seed(seed)
    began = time.perf_counter()
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, num_return_sequences=args.samples_per_prompt,
                                pad_token_id=pad_id)
    seconds = time.perf_counter() - began
    return seconds, output.shape[0] * (output.shape[1] - input_ids.shape[1])


SIDES = {"advantage": run_ours, "transformers": run_transformers}


def print_table(rows: list[dict], expected_tokens: int) -> None:
    """A markdown table: the median tokens per second of each side and their ratio."""
    median = {side: statistics.median(row["tokens_per_s"] for row in rows if row["side"] == side) for side in SIDES}
    print("\n| sampler | tokens per call | median tokens/s | runs |")
    print("|---|---|---|---|")
    for side in SIDES:
        runs = ", ".join(f"{row['tokens_per_s']:.0f}" for row in rows if row["side"] == side)
        print(f"| {side} | {expected_tokens} | {median[side]:.0f} | {runs} |")
    print(f"\nratio advantage / transformers: {median['advantage'] / median['transformers']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-dir", default="/work/shared/bench", help="directory of tiny_lm.py")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, pad_id, prompts = load_workload(args)
    expected_tokens = args.prompts * args.samples_per_prompt * args.new_tokens
    for side, run in SIDES.items():  # warm-up: first-call allocations and lazy imports
        run(model, prompts, pad_id, args, seed=0)
    rows = []
    for repeat in range(args.repeats):
        for side, run in SIDES.items():
            seconds, tokens = run(model, prompts, pad_id, args, seed=1 + repeat)
            if tokens != expected_tokens:
                raise SystemExit(f"{side} produced {tokens} tokens, expected {expected_tokens}")
            row = {"side": side, "repeat": repeat, "threads": torch.get_num_threads(), "rows": len(prompts) *
                   args.samples_per_prompt, "tokens": tokens, "seconds": round(seconds, 4),
                   "tokens_per_s": round(tokens / seconds, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print_table(rows, expected_tokens)


if __name__ == "__main__":
    main()
