"""advantage: policy-gradient reinforcement learning from the first derivation to aligning language models.

One entry point for both halves:

    import advantage
    run = advantage.train("ppo", env_id="CartPole-v1", total_steps=50_000, out="runs/cartpole")
    run = advantage.train("sft", model="builtin:nano", task="arithmetic", max_steps=200, out="runs/sft")
    advantage.resume("runs/cartpole", total_steps=80_000)
"""

__version__ = "0.1.0"


def train(algorithm: str, out=None, config_file=None, use_preset: bool = True, **fields):
    """Train `algorithm` and return its run: a classic algorithm ("reinforce", "a2c", "ppo", "trpo", "dqn"; see
    advantage.rl.api.train) or a language-model stage ("sft", "reward", "dpo", "grpo", "rlhf"; see
    advantage.lm.session.train). `fields` are any fields of its config; `use_preset` (the shipped preset for the
    environment) applies to the classic algorithms only. Imports are lazy: `import advantage` stays light."""
    from advantage.rl.api import ALGORITHMS

    if algorithm in ALGORITHMS:
        from advantage.rl.api import train as train_classic

        return train_classic(algorithm, out, config_file, use_preset, **fields)
    from advantage.lm.session import train as train_stage

    return train_stage(algorithm, out, config_file, **fields)


def resume(run_dir, **fields):
    """Continue the run in `run_dir` (either half) from its last checkpoint; `fields` may override, e.g. a larger
    total_steps or max_steps."""
    from pathlib import Path

    from advantage.rl.api import ALGORITHMS
    from advantage.run.config import load_yaml_mapping

    config = Path(run_dir) / "config.yaml"
    if config.exists() and load_yaml_mapping(config).get("algorithm") not in ALGORITHMS:
        from advantage.lm.session import resume as resume_stage

        return resume_stage(run_dir, **fields)
    from advantage.rl.api import resume as resume_classic

    return resume_classic(run_dir, **fields)
