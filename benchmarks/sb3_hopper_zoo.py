"""Stable-Baselines3 PPO with rl-baselines3-zoo's tuned Hopper entry on Hopper-v5: the return it reaches here.

The peer side of the "tuned preset" row of the MuJoCo table in benchmarks/README.md: the same hyperparameters our
`Hopper-v5` preset ships, run by SB3 itself on this machine, so that "does the zoo entry reach 2,410 on Hopper-v5
with this seed?" is measured rather than assumed. Run it from the peers' virtual environment (SB3 + MuJoCo):

    /tmp/peers/bin/python benchmarks/sb3_hopper_zoo.py --seed 1 --timesteps 1000000 --out /tmp/sb3-hopper-1

Writes OUT/episodes.jsonl (step, return, length of every training episode) and prints one JSON line: the mean
return of the last 20 training episodes, the best such mean, and a deterministic evaluation over 10 episodes with
the normalisation statistics frozen (the zoo's measure).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    """Train, log every episode, evaluate; print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timesteps", type=int, default=1_000_000)
    parser.add_argument("--env-id", default="Hopper-v5")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import numpy as np
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_episodes import episode_logger

    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    gamma = 0.999
    env = make_vec_env(args.env_id, n_envs=1, seed=args.seed)
    # The zoo passes the algorithm's gamma to VecNormalize's return statistics.
    env = VecNormalize(env, norm_obs=True, norm_reward=True, gamma=gamma)
    model = PPO("MlpPolicy", env, seed=args.seed, device="cpu", verbose=0, n_steps=512, batch_size=32, n_epochs=5,
                gamma=gamma, gae_lambda=0.99, learning_rate=9.80828e-05, ent_coef=0.00229519, clip_range=0.2,
                max_grad_norm=0.7, vf_coef=0.835671,
                policy_kwargs=dict(log_std_init=-2, ortho_init=False, activation_fn=torch.nn.ReLU,
                                   net_arch=dict(pi=[256, 256], vf=[256, 256])))
    episodes, returns = episode_logger(os.path.join(args.out, "episodes.jsonl"))

    start = time.perf_counter()
    model.learn(total_timesteps=args.timesteps, callback=episodes)
    wall = time.perf_counter() - start
    episodes.log.close()
    means = [float(np.mean(returns[max(0, i - 19):i + 1])) for i in range(19, len(returns))]

    env.training = False
    env.norm_reward = False
    scores = []
    for episode in range(10):
        env.seed(10_000 + episode)
        observation, done, total = env.reset(), False, 0.0
        while not done:
            action, _ = model.predict(observation, deterministic=True)
            observation, reward, dones, _ = env.step(action)
            total += float(env.get_original_reward()[0])
            done = bool(dones[0])
        scores.append(total)
    print(json.dumps({"seed": args.seed, "timesteps": int(model.num_timesteps), "wall_s": round(wall, 1),
                      "last20": round(means[-1], 1) if means else None,
                      "best20": round(max(means), 1) if means else None,
                      "eval_mean": round(float(np.mean(scores)), 1), "eval_std": round(float(np.std(scores)), 1)}))


if __name__ == "__main__":
    main()
