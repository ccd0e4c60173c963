"""Every random stream of a run is a function of its seed and of where the run is, so that a resumed run draws
exactly what an uninterrupted one would have drawn."""

from __future__ import annotations

# Large primes, so that different (seed, index, offset) give different seeds for every value a run reaches: the
# seeds of one run lie 1,000,003 apart, indices (iterations, epochs, rounds) 7,919 apart, offsets (a process rank,
# a chunk of prompts) 1 apart.
SEED_STRIDE = 1_000_003
INDEX_STRIDE = 7_919


def derive_seed(seed: int, index: int = 0, offset: int = 0) -> int:
    """seed * 1,000,003 + index * 7,919 + offset: the seed of one random stream of a run.

    Args:
        seed: the run's seed (config.seed).
        index: where the run is: the iteration of a classic algorithm's segment, the epoch of the data order, the
            rollout round of grpo or rlhf.
        offset: which of several streams at the same index: a process rank, the first prompt of a chunk, a purpose.
    """
    return seed * SEED_STRIDE + index * INDEX_STRIDE + offset
