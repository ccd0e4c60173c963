"""The run directory every algorithm writes: config.yaml, metrics.jsonl, episodes.jsonl, TensorBoard events,
checkpoints/ and final/ (config.py, metrics.py, checkpoint.py; progress.py and report.py show them)."""
