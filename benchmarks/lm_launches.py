"""Tensor operations per optimizer step, ours against TRL's, on the speed workloads: a GPU's kernel launches, counted
on the CPU.

On a GPU, a small model's training step is bound by launches, not arithmetic: each tensor operation that is not a
view starts at least one kernel and costs the host several microseconds to issue, whatever its size. SmolLM2-135M's
DPO step of 8 pairs is about 0.3 TFLOP (a few milliseconds on an H200) but several thousand operations (tens of
milliseconds to issue). So where no GPU is at hand, the number of operations each side issues per step predicts the
ratio a GPU would measure in that regime, and says which lever could move it.

This script runs one side's training on the CPU under a `TorchDispatchMode` that counts every ATen operation that
is not a view (`OpOverload.is_view`, `detach`), by phase:
    sampling        inside the sampler (ours: `generation.generate`; TRL: transformers' `generate`)
    batch building  inside the collation of the examples (host-side work on a GPU for both sides: ours
                    `collate_shared_prompt`, TRL's data collators)
    the rest        forward and backward passes, the reference pass, losses, clipping, the optimizer
Loading the model, adding LoRA adapters and writing the final model are not counted (ours: `load_policy`, `add_lora`,
`LMSession.finish`; TRL's region is `trainer.train()`). Figures are per optimizer step. With CUDA graphs (ours,
`--cuda-graphs`, on a GPU) a whole decoding step is one replay: the side "advantage+graphs" runs our sampler's
fixed-shape step (what the graph captures) and the training passes of DPO, GRPO and the reward model on the input
buffers of `cuda_graphs.GraphedPasses`, and counts each call that a GPU would replay as one launch (a shape's first
pass runs eagerly there too, and is counted in full).

Usage (each side in its own process; ours with PYTHONPATH=src, TRL's with trl importable):
    python benchmarks/lm_launches.py --bench-dir ../shared/bench [--peers-python /tmp/peers/bin/python]
        [--stages dpo,reward,grpo] [--pairs 64] [--model-dir DIR --lora-r 16]
Prints one JSON line per side and stage, then a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PHASES = ("sampling", "batch building", "the rest")


class OperationCounter(TorchDispatchMode):
    """Counts the non-view ATen operations dispatched while `counting` is set, by the phase in `phase`."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = False
        self.phase = "the rest"
        self.counts: collections.Counter = collections.Counter()
        self.replays = 0

    def one_launch(self, function, *args):
        """`function(*args)`, counted as one launch (what a CUDA graph's replay of it costs)."""
        counting, self.counting = self.counting, False
        try:
            return function(*args)
        finally:
            self.counting = counting
            self.counts[self.phase] += 1
            self.replays += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting and not func.is_view and func is not torch.ops.aten.detach.default:
            self.counts[self.phase] += 1
        return func(*args, **(kwargs or {}))


def within(owner, name: str, counter: OperationCounter, phase: str | None = None, counting: bool | None = None):
    """Wrap `owner.name` so that its calls run in `phase` and/or with counting switched on or off."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        before = counter.phase, counter.counting
        if phase is not None and counter.phase != "sampling":  # collation inside the sampler stays sampling
            counter.phase = phase
        if counting is not None:
            counter.counting = counting
        try:
            return original(*args, **kwargs)
        finally:
            counter.phase, counter.counting = before

    setattr(owner, name, wrapped)


def ours(stage: str, bench_dir: str, model_dir: str, lora_r: int, counter: OperationCounter,
         graphs: bool) -> dict:
    """Our side: the children of lm_speed.py (DPO, reward) and lm_grpo.py (GRPO), counted. `graphs`: count what a
    GPU with CUDA graphs would launch (`cuda_graphs.FixedShapeStep`, run here without a capture: one launch a call)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from advantage.lm import dpo, generation, grpo, logprobs, online, preferences, reward, session

    for module in (dpo, reward, online):
        within(module, "load_policy", counter, counting=False)
    for module in (dpo, grpo, reward):  # TRL makes its adapters before `trainer.train()`, its counted region
        within(module, "add_lora", counter, counting=False)
    within(session.LMSession, "finish", counter, counting=False)
    for module in (logprobs, preferences, online, grpo):
        if hasattr(module, "collate_shared_prompt"):
            within(module, "collate_shared_prompt", counter, phase="batch building")
    for module in (generation, online):
        if hasattr(module, "generate"):
            within(module, "generate", counter, phase="sampling")
    if graphs:  # the decoding step a CUDA graph would replay: run fixed-shape, count each call as one launch
        from advantage.lm import cuda_graphs

        generation.decoding_mode = lambda *args, **kwargs: "fixed"
        forward = cuda_graphs.FixedShapeStep._forward
        cuda_graphs.FixedShapeStep._forward = lambda self: counter.one_launch(forward, self)
        within(cuda_graphs.FixedShapeStep, "__init__", counter, counting=True)  # warm-up: eager on a GPU too

        class CountedPasses(cuda_graphs.GraphedPasses):
            """A shape's first pass runs eagerly (as on a GPU); each later one, what a graph replays, is one launch."""

            def _recorded(self, graphed, compute):
                return counter.one_launch(super()._recorded, graphed, compute)

        for module in (dpo, grpo, reward):
            module.training_graphs = lambda model, *args, **kwargs: CountedPasses(model.parameters(), capture=False)
        dpo.GraphedPasses = CountedPasses  # the reference pass's
    counter.counting = True
    if stage == "grpo":
        import lm_grpo

        result = lm_grpo.child(bench_dir, 2, 0.0, model_dir, lora_r, steps=4)
        return {"steps": result["steps"]}
    import lm_speed

    result = lm_speed.child(stage, bench_dir, 2, int(os.environ.get("LAUNCHES_PAIRS", "64")), False, model_dir,
                            lora_r)
    return {"steps": result["steps"]}


def trl_side(stage: str, bench_dir: str, model_dir: str, lora_r: int, counter: OperationCounter,
             graphs: bool) -> dict:
    """TRL's side: the children of ../shared/bench/trl_*.py, counted inside `trainer.train()`."""
    import transformers
    import trl
    from trl.trainer import dpo_trainer, reward_trainer

    within(transformers.GenerationMixin, "generate", counter, phase="sampling")
    for module in (dpo_trainer, reward_trainer):
        within(module.DataCollatorForPreference, "__call__", counter, phase="batch building")
    trainer = {"dpo": trl.DPOTrainer, "reward": trl.RewardTrainer, "grpo": trl.GRPOTrainer}[stage]
    within(trainer, "train", counter, counting=True)
    arguments = dict(threads=2, model_dir=model_dir, lora_r=lora_r)
    if stage == "grpo":
        import trl_grpo

        result = trl_grpo.child(argparse.Namespace(prompts=64, prompts_per_step=8, num_generations=8, prompt_len=32,
                                                   completion_len=32, steps=4, beta=0.0, **arguments))
    else:
        import trl_dpo
        import trl_reward

        script = trl_dpo if stage == "dpo" else trl_reward
        pairs = int(os.environ.get("LAUNCHES_PAIRS", "64"))
        result = script.child(argparse.Namespace(pairs=pairs, batch=8, prompt_len=32, completion_len=32, **arguments))
    return {"steps": result["steps"]}


def child(side: str, stage: str, bench_dir: str, model_dir: str, lora_r: int) -> dict:
    """One side's counts per optimizer step, in this process."""
    torch.set_num_threads(2)
    sys.path.insert(0, bench_dir)
    counter = OperationCounter()
    graphs = side.endswith("+graphs")
    with counter:
        found = (ours if side.startswith("advantage") else trl_side)(stage, bench_dir, model_dir, lora_r, counter,
                                                                     graphs)
    steps = found["steps"]
    per_step = {phase: round(counter.counts[phase] / steps, 1) for phase in PHASES}
    return {"side": side, "stage": stage, "steps": steps, **per_step,
            "total": round(sum(counter.counts.values()) / steps, 1), "graph_replays": counter.replays}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--peers-python", default="", help="python that imports trl (empty: ours only)")
    parser.add_argument("--stages", default="dpo,reward,grpo")
    parser.add_argument("--model-dir", default="", help="a Hugging Face model directory (default: tiny_lm's model)")
    parser.add_argument("--lora-r", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=64, help="preference pairs of the DPO and reward runs (8 a step)")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    bench_dir = os.path.abspath(args.bench_dir)
    if args.child:
        print(json.dumps(child(*args.child, bench_dir, args.model_dir, args.lora_r)))
        return
    rows = []
    for stage in args.stages.split(","):
        sides = [("advantage", sys.executable), ("advantage+graphs", sys.executable)]
        sides += [("trl", args.peers_python)] if args.peers_python else []
        for side, python in sides:
            command = [python, os.path.abspath(__file__), "--child", side, stage, "--bench-dir", bench_dir,
                       "--model-dir", args.model_dir, "--lora-r", str(args.lora_r)]
            env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                       LAUNCHES_PAIRS=str(args.pairs))
            with tempfile.TemporaryDirectory() as scratch:
                done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=scratch)
            if done.returncode != 0:
                raise SystemExit(f"{side} {stage} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| stage | side | sampling | batch building | the rest | total per step |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['side']} | {row['sampling']:,.0f} | {row['batch building']:,.0f} | "
              f"{row['the rest']:,.0f} | {row['total']:,.0f} |")


if __name__ == "__main__":
    main()
