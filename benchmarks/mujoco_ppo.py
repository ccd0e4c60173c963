"""PPO on MuJoCo (Hopper-v5, HalfCheetah-v5): final return after 1M steps, and raw speed.

Two settings per environment:
  paper   benchmarks/configs/ppo_mujoco_paper.yaml: the PPO paper's MuJoCo hyperparameters as CleanRL's
          ppo_continuous_action.py sets them (its published 1M-step results: Hopper 2383, HalfCheetah 1443)
  preset  the shipped preset (HalfCheetah: rl-baselines3-zoo's tuned entry; Hopper: the paper's settings, since the
          zoo's entry only stands on Hopper-v5; the zoo's results: Hopper 2410, HalfCheetah 5819)

Each run is a fresh process (`advantage train ppo`, one torch thread). Final return = mean of the last 20 finished
training episodes (stochastic policy, CleanRL's measure); `eval` = `advantage eval` of final/ over 10 episodes with
the deterministic policy (the zoo's measure).

Usage:
    python benchmarks/mujoco_ppo.py --envs Hopper-v5,HalfCheetah-v5 --settings paper,preset --seeds 1 --out DIR
    python benchmarks/mujoco_ppo.py --envs Hopper-v5 --settings paper --seeds 1,2,3 --steps 100000   # speed
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

HERE = Path(__file__).resolve().parent
PAPER = HERE / "configs" / "ppo_mujoco_paper.yaml"


def final_return(run_dir: Path, window: int = 20) -> float | None:
    rows = [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines()]
    return statistics.fmean(r["return"] for r in rows[-window:]) if rows else None


def run(env_id: str, setting: str, seed: int, steps: int | None, out: Path, evaluate: bool) -> dict:
    command = [sys.executable, "-m", "advantage.cli", "train", "ppo", "--env-id", env_id, "--seed", str(seed),
               "--out", str(out), "--progress", "false", "--tensorboard", "false", "--threads", "1"]
    if setting == "paper":
        command += ["--config", str(PAPER)]
    if steps:
        command += ["--total-steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {"env_id": env_id, "setting": setting, "seed": seed, "steps": metrics[-1]["step"],
              "time_s": metrics[-1]["time_s"], "sps": metrics[-1]["charts/sps"],
              "final_return": final_return(out)}
    if evaluate:
        evaluated = subprocess.run([sys.executable, "-m", "advantage.cli", "eval", str(out), "--episodes", "10"],
                                   capture_output=True, text=True, check=True)
        result["eval_return"] = json.loads(evaluated.stdout.strip().splitlines()[-1])["mean_return"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="Hopper-v5,HalfCheetah-v5")
    parser.add_argument("--settings", default="paper,preset")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--steps", type=int, default=None, help="override total_steps (default: 1M from the config)")
    parser.add_argument("--no-eval", action="store_true", help="skip the deterministic evaluation")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="advantage-mujoco-"))
    rows = []
    for env_id in args.envs.split(","):
        for setting in args.settings.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                result = run(env_id, setting, seed, args.steps, root / f"{env_id}-{setting}-seed{seed}",
                             not args.no_eval)
                print(json.dumps(result), flush=True)
                rows.append(result)
    print("\n| env | setting | seeds | steps | sps (median) | final return (mean of last 20 episodes) | eval |")
    print("|---|---|---|---|---|---|---|")
    for env_id in args.envs.split(","):
        for setting in args.settings.split(","):
            group = [r for r in rows if r["env_id"] == env_id and r["setting"] == setting]
            finals = ", ".join("-" if r["final_return"] is None else f"{r['final_return']:.0f}" for r in group)
            evals = ", ".join(f"{r['eval_return']:.0f}" for r in group if "eval_return" in r) or "-"
            print(f"| {env_id} | {setting} | {len(group)} | {group[0]['steps']} | "
                  f"{statistics.median(r['sps'] for r in group):.0f} | {finals} | {evals} |")


if __name__ == "__main__":
    main()
