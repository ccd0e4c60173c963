"""Whole rankings against best-vs-worst pairs (issue 4), on the arithmetic task's K = 4 rankings.

Each held-out and training prompt "a+b=" comes with 4 answers ranked best first: the right one, then wrong ones by
increasing distance from it (arithmetic.py). At the same data budget (the same 360 training prompts, the same
optimizer steps and batch of prompts), is it better to learn from the whole ranking, Plackett-Luce (seed 004) or
InstructGPT's K-wise pairs (seed 000), than from its best and worst answer only (`--ranking-answers best_worst`,
where every loss is Bradley-Terry on that one pair)?

Measured on the 40 held-out prompts: pairwise accuracy over all C(4, 2) = 6 pairs of every held-out ranking (240
pairs), the reward model's `eval/accuracy`; for DPO the policy's own `eval/logp_accuracy` (log pi(y_i) > log pi(y_j))
and the implicit-reward `eval/accuracy`.

Runs, per seed (each a fresh process of the `advantage` CLI, one torch thread, builtin:nano, operands 0..19):
    sft      800 steps of SFT on the same training prompts (the starting point of the "sft" rows)
    reward   from random weights and from the SFT model: plackett_luce, kwise, best_worst, 300 steps of 32 prompts
    dpo      from the SFT model: plackett_luce and best_worst, 300 steps of 32 prompts, beta 0.1

best_worst runs go through half the sequences of the whole-ranking runs (2 answers per prompt instead of 4): the
budget held equal is prompts and steps, as the issue asks, not compute.

Usage:
    python benchmarks/lm_rankings.py [--seeds 1,2,3] [--out DIR]
Prints one JSON object per run and a markdown table at the end; --out keeps the run directories.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TASK = ["--task", "arithmetic", "--task-max-operand", "19", "--task-train-size", "360", "--task-eval-size", "40"]
COMMON = ["--progress", "false", "--tensorboard", "false", "--threads", "1", "--batch-size", "32",
          "--lr-schedule", "cosine"]
VARIANTS = {"plackett_luce": ["--loss", "plackett_luce"], "kwise": ["--loss", "kwise"],
            "best_worst": ["--loss", "plackett_luce", "--ranking-answers", "best_worst"]}


def advantage(stage: str, arguments: list[str], out: Path) -> list[dict]:
    """Run one stage in a fresh process; return its metrics lines."""
    command = [sys.executable, "-m", "advantage.cli", stage, *TASK, *COMMON, *arguments, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def print_table(results: list[dict]) -> None:
    """A markdown table: per (stage, start, variant), the held-out accuracy before -> after (mean over seeds)."""
    measures = {"reward": [("accuracy", "reward")],
                "dpo": [("logp_accuracy", "log pi"), ("accuracy", "implicit reward")]}
    print("\n| stage | start | trained on | held-out pairwise accuracy of | before -> after (seed mean) | per seed |")
    print("|---|---|---|---|---|---|")
    for key in dict.fromkeys((r["stage"], r["start"], r["variant"]) for r in results):
        group = [r for r in results if (r["stage"], r["start"], r["variant"]) == key]
        trained_on = f"{'best vs worst' if key[2] == 'best_worst' else 'whole ranking'} ({key[2]})"
        for measure, name in measures[key[0]]:
            before = statistics.fmean(r[f"{measure}_before"] for r in group)
            after = [r[measure] for r in group]
            print(f"| {key[0]} | {key[1]} | {trained_on} | {name} | {before:.3f} -> {statistics.fmean(after):.3f} | "
                  f"{', '.join(f'{value:.3f}' for value in after)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every reward and DPO run")
    parser.add_argument("--out", default=None, help="keep the run directories here (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="advantage-rankings-"))
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        sft_dir = root / f"sft-seed{seed}"
        advantage("sft", ["--model", "builtin:nano", "--seed", str(seed), "--max-steps", "800", "--learning-rate",
                          "3e-3", "--warmup-steps", "10", "--eval-every", "800"], sft_dir)
        sft_model = str(sft_dir / "final")
        runs = [("reward", start, model, learning_rate, variant)
                for start, model, learning_rate in (("random", "builtin:nano", "3e-3"), ("sft", sft_model, "5e-4"))
                for variant in VARIANTS]
        runs += [("dpo", "sft", sft_model, "1e-3", variant) for variant in ("plackett_luce", "best_worst")]
        for stage, start, model, learning_rate, variant in runs:
            out = root / f"{stage}-{start}-{variant}-seed{seed}"
            rows = advantage(stage, ["--model", model, "--seed", str(seed), "--max-steps", str(args.steps),
                                     "--learning-rate", learning_rate, *VARIANTS[variant]], out)
            first, last = rows[0], rows[-1]
            result = {"stage": stage, "start": start, "variant": variant, "seed": seed, "steps": last["step"],
                      "time_s": last["time_s"], "accuracy_before": first["eval/accuracy"],
                      "accuracy": last["eval/accuracy"], "margin": last["eval/margin"]}
            if stage == "dpo":
                result.update(logp_accuracy_before=first["eval/logp_accuracy"],
                              logp_accuracy=last["eval/logp_accuracy"])
            print(json.dumps(result), flush=True)
            results.append(result)

    print_table(results)
    print(f"\nrun directories: {root}")


if __name__ == "__main__":
    main()
