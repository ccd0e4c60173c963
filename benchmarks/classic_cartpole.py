"""Classic-RL benchmarks on CartPole-v1: time and steps to solve with each algorithm's preset, and PPO's raw speed
with CleanRL's default hyperparameters. Each run is a fresh process (`advantage train`) with one torch thread.

Usage:
    python benchmarks/classic_cartpole.py [--seeds 1,2,3] [--algorithms reinforce,a2c,ppo,trpo,dqn] [--out DIR]
    python benchmarks/classic_cartpole.py --env-id Acrobot-v1 --threshold -100 --sps-steps 0   # other tasks
Prints one JSON object per measurement and a markdown table at the end.

Solved = the mean return of the last 20 finished training episodes first reaches 475, the criterion of
../shared/bench (time counted from the start of training: after imports and network construction, as SB3's
learn()).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = {"reinforce": 200_000, "a2c": 300_000, "ppo": 100_000, "trpo": 150_000, "dqn": 400_000}


def solved_at(run_dir: Path, threshold: float, window: int = 20):
    rows = [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines()]
    for i in range(window, len(rows) + 1):
        if statistics.fmean(r["return"] for r in rows[i - window:i]) >= threshold:
            return rows[i - 1]["step"], rows[i - 1]["time_s"]
    return None, None


def train(arguments: list[str], out: Path) -> dict:
    command = [sys.executable, "-m", "advantage.cli", "train", *arguments, "--out", str(out), "--progress", "false",
               "--tensorboard", "false", "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"steps": metrics[-1]["step"], "time_s": metrics[-1]["time_s"], "sps": metrics[-1]["charts/sps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--algorithms", default="reinforce,a2c,ppo,trpo,dqn")
    parser.add_argument("--sps-steps", type=int, default=100_352,
                        help="steps of the CleanRL-defaults speed run on CartPole (0 skips it)")
    parser.add_argument("--env-id", default="CartPole-v1")
    parser.add_argument("--threshold", type=float, default=475.0, help="solved: mean of 20 episodes reaches this")
    parser.add_argument("--steps", type=int, default=None,
                        help="total steps of every run (default: CartPole's table, else the preset's)")
    parser.add_argument("--out", default=None, help="keep the run directories here (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="advantage-bench-"))
    seeds = [int(s) for s in args.seeds.split(",")]
    table = []
    for algorithm in args.algorithms.split(","):
        results = []
        for seed in seeds:
            out = root / f"{algorithm}-seed{seed}"
            steps = args.steps or (STEPS[algorithm] if args.env_id == "CartPole-v1" else None)
            summary = train([algorithm, "--env-id", args.env_id, "--seed", str(seed),
                             *(["--total-steps", str(steps)] if steps else [])], out)
            step, time_s = solved_at(out, args.threshold)
            results.append({"algorithm": algorithm, "seed": seed, "solved_step": step, "solved_time_s": time_s,
                            **summary})
            print(json.dumps(results[-1]), flush=True)
        solved = [r for r in results if r["solved_step"] is not None]
        table.append((algorithm, len(solved), len(results),
                      statistics.median(r["solved_step"] for r in solved) if solved else None,
                      statistics.median(r["solved_time_s"] for r in solved) if solved else None,
                      statistics.median(r["sps"] for r in results)))
    speed = []
    for seed in seeds if args.sps_steps else []:
        out = root / f"ppo-cleanrl-defaults-seed{seed}"
        speed.append(train(["ppo", "--env-id", "CartPole-v1", "--no-preset", "--seed", str(seed), "--total-steps",
                            str(args.sps_steps)], out)["sps"])
        print(json.dumps({"ppo_cleanrl_defaults_sps": speed[-1], "seed": seed}), flush=True)
    goal = f"{args.threshold:g}"
    print(f"\n{args.env_id}\n| algorithm (preset) | solved | median steps to {goal} | median seconds to {goal} "
          f"| steps/s |")
    print("|---|---|---|---|---|")
    for algorithm, n_solved, n, step, time_s, sps in table:
        print(f"| {algorithm} | {n_solved}/{n} | {step if step is None else f'{step:,.0f}'} | "
              f"{time_s if time_s is None else f'{time_s:.1f}'} | {sps:,.0f} |")
    if speed:
        print(f"\nPPO with CleanRL's ppo.py defaults (4 envs x 128 steps, 4 minibatches, 4 epochs), "
              f"{args.sps_steps} steps: "
              f"median {statistics.median(speed):,.0f} steps/s over seeds {args.seeds}")


if __name__ == "__main__":
    main()
