"""PPO's defaults where no preset exists, side by side with Stable-Baselines3's defaults (issue 16).

A new user's first run: `advantage train ppo --env-id ENV --no-preset` with no other setting (so the defaults for the
environment's action space apply: Box actions get the PPO paper's MuJoCo settings, Discrete actions CleanRL's) against
`PPO("MlpPolicy", ENV)` of Stable-Baselines3 (benchmarks/sb3_defaults.py), the same step budget, the same seeds, one
torch thread each, in one sitting. Jobs run `--jobs` at a time (default 2, one per core), ours and SB3's
interleaved so that both sides meet the same load.

Final return = mean of the last 20 training episodes (stochastic policy; both sides log every finished episode);
time = wall seconds of training (our run's time_s; SB3's `learn()`).

Usage (the peers' environment as in ../shared/bench/README.md: SB3 + gymnasium[mujoco]):
    python benchmarks/defaults_vs_sb3.py --peer-python /tmp/peers/bin/python --seeds 1,2,3 --out /tmp/defaults
Each finished run appends one JSON line to OUT/results.jsonl (a rerun skips what is there); a markdown table is
printed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Environment -> steps for both sides: what SB3's defaults need to be well on their way on each task here.
BUDGETS = {"InvertedDoublePendulum-v5": 200_000, "Reacher-v5": 200_000, "Swimmer-v5": 200_000,
           "Acrobot-v1": 200_000, "MountainCar-v0": 200_000}


def last_mean(episodes: Path, window: int = 20) -> float | None:
    """Mean return of the last `window` episodes of an episodes.jsonl, or None if there are none."""
    rows = [json.loads(line) for line in episodes.read_text().splitlines() if line.strip()]
    return statistics.fmean(row["return"] for row in rows[-window:]) if rows else None


def ours(env_id: str, seed: int, steps: int, out: Path) -> dict:
    """One run of `advantage train ppo` with its defaults (no preset)."""
    command = [sys.executable, "-m", "advantage.cli", "train", "ppo", "--env-id", env_id, "--seed", str(seed),
               "--total-steps", str(steps), "--no-preset", "--threads", "1", "--progress", "false",
               "--tensorboard", "false", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip().splitlines()[-1:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = (out / "episodes.jsonl").read_text().splitlines()
    return {"side": "ours", "env_id": env_id, "seed": seed, "steps": metrics[-1]["step"],
            "time_s": metrics[-1]["time_s"], "final_return": last_mean(out / "episodes.jsonl"),
            "episodes": len(rows), "defaults": done.stderr.strip().splitlines()[0]}


def peer(python: str, env_id: str, seed: int, steps: int, out: Path) -> dict:
    """One run of SB3's PPO with its defaults."""
    command = [python, str(HERE / "sb3_defaults.py"), "--env-id", env_id, "--seed", str(seed), "--timesteps",
               str(steps), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """Markdown: per environment, both sides' final return (mean over seeds, and each seed) and seconds."""
    lines = ["| environment | steps | ours: final return (seeds) | SB3: final return (seeds) | ours s | SB3 s |",
             "|---|---|---|---|---|---|"]
    for env_id, steps in BUDGETS.items():
        cells = []
        for side in ("ours", "sb3"):
            rows = sorted((r for r in results if r["env_id"] == env_id and r["side"] == side), key=lambda r: r["seed"])
            finals = [r["final_return"] for r in rows if r["final_return"] is not None]
            seconds = [r["time_s"] for r in rows]
            each = " / ".join(f"{value:.1f}" for value in finals)
            cells.append((f"**{statistics.fmean(finals):.1f}** ({each})" if finals else "-",
                          f"{statistics.fmean(seconds):.0f}" if seconds else "-"))
        lines.append(f"| {env_id} | {steps:,} | {cells[0][0]} | {cells[1][0]} | {cells[0][1]} | {cells[1][1]} |")
    return "\n".join(lines)


def main() -> None:
    """Run every (environment, seed, side) not yet in OUT/results.jsonl, then print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", required=True, help="python of the peers' environment (SB3, MuJoCo)")
    parser.add_argument("--envs", default=",".join(BUDGETS))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--sides", default="ours,sb3", help="ours, sb3 or both (comma separated)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    have = {(r["side"], r["env_id"], r["seed"]) for r in done}
    jobs = [(side, env_id, int(seed)) for env_id in args.envs.split(",") for seed in args.seeds.split(",")
            for side in args.sides.split(",") if (side, env_id, int(seed)) not in have]

    def work(job: tuple[str, str, int]) -> dict:
        side, env_id, seed = job
        directory = out / f"{side}-{env_id}-seed{seed}"
        if side == "ours":
            result = ours(env_id, seed, BUDGETS[env_id], directory)
        else:
            result = peer(args.peer_python, env_id, seed, BUDGETS[env_id], directory)
        print(json.dumps(result), flush=True)
        with results_path.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        done += list(pool.map(work, jobs))
    print(table(done))


if __name__ == "__main__":
    main()
