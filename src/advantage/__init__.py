"""advantage: policy-gradient reinforcement learning from the first derivation to aligning language models."""

__version__ = "0.1.0"


def train(algorithm: str, out=None, config_file=None, use_preset: bool = True, **fields):
    """Train a classic RL algorithm; see advantage.rl.api.train (imported lazily: `import advantage` stays light)."""
    from advantage.rl.api import train as _train

    return _train(algorithm, out, config_file, use_preset, **fields)


def resume(run_dir, **fields):
    """Continue a run from its last checkpoint; see advantage.rl.api.resume."""
    from advantage.rl.api import resume as _resume

    return _resume(run_dir, **fields)
