"""Stable-Baselines3 PPO with every setting at its default, on one environment: the peer side of the "defaults
without a preset" table (benchmarks/defaults_vs_sb3.py runs it; issue 16).

`PPO("MlpPolicy", env)` on `make_vec_env(ENV, n_envs=1)`: 2,048 steps a rollout, minibatches of 64, 10 epochs,
Adam 3e-4, gamma 0.99, lambda 0.95, clip 0.2, no entropy bonus, no normalisation, one torch thread. Run it from the
peers' virtual environment (SB3 + MuJoCo):

    /tmp/peers/bin/python benchmarks/sb3_defaults.py --env-id Swimmer-v5 --seed 1 --timesteps 200000 --out DIR

Writes DIR/episodes.jsonl (step, return, length of every training episode) and prints one JSON line: the mean
return of the last 20 training episodes and the wall seconds of `learn()`.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    """Train with the defaults, log every episode, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timesteps", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import numpy as np
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    from sb3_episodes import episode_logger

    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    env = make_vec_env(args.env_id, n_envs=1, seed=args.seed)
    model = PPO("MlpPolicy", env, seed=args.seed, device="cpu", verbose=0)
    episodes, returns = episode_logger(os.path.join(args.out, "episodes.jsonl"))

    start = time.perf_counter()
    model.learn(total_timesteps=args.timesteps, callback=episodes)
    wall = time.perf_counter() - start
    episodes.log.close()
    final = float(np.mean(returns[-20:])) if returns else None
    print(json.dumps({"side": "sb3", "env_id": args.env_id, "seed": args.seed, "steps": int(model.num_timesteps),
                      "time_s": round(wall, 1), "final_return": final, "episodes": len(returns)}))


if __name__ == "__main__":
    main()
