#!/usr/bin/env bash
# One sitting of the classic-RL speed comparisons, interleaved seed by seed (ours, then the peers), so that the
# machine's drift hits both sides alike. Needs the peers' virtual environment (../shared/bench/README.md) and
# CleanRL's gym-v1.1 sources (CLEANRL_GIT_DIR).
#   PEERS_PYTHON=/tmp/peers/bin/python CLEANRL_GIT_DIR=... bash benchmarks/side_by_side.sh [SEEDS] > sitting.log
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bench="$root/../shared/bench"
ours="$root/.venv/bin/python"
peers="${PEERS_PYTHON:-/tmp/peers/bin/python}"
for seed in ${1:-1 2 3}; do
    echo "## seed $seed"
    # CartPole: PPO with the zoo preset (time to 475) and with CleanRL's ppo.py defaults (steps/s)
    "$ours" "$root/benchmarks/classic_cartpole.py" --seeds "$seed" --algorithms ppo --sps-steps 200192 | grep '^{'
    (cd "$bench" && "$peers" sb3_cartpole_ppo.py --seeds "$seed" | tail -1)
    (cd "$bench" && "$peers" cleanrl_cartpole_ppo.py --seeds "$seed" --timesteps 200000 | tail -1)
    # Hopper-v5: PPO with the paper's MuJoCo hyperparameters (steps/s)
    "$ours" "$root/benchmarks/mujoco_ppo.py" --envs Hopper-v5 --settings paper --seeds "$seed" --steps 49152 --no-eval \
        | grep '^{'
    (cd "$bench" && "$peers" cleanrl_hopper_ppo.py --seeds "$seed" --timesteps 49152 | tail -1)
done
