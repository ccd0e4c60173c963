"""Classic RL on Gymnasium: REINFORCE, A2C, PPO, TRPO, DQN, each a config dataclass and a readable loop."""
