"""advantage: policy-gradient reinforcement learning from the first derivation to aligning language models."""

__version__ = "0.1.0"
