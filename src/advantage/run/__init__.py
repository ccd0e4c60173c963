"""The run directory every algorithm writes: config.yaml, metrics.jsonl, episodes.jsonl, TensorBoard events,
checkpoints/ and final/ (see advantage.run.directory)."""
