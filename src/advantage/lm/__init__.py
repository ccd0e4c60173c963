"""Language models as policies: tokenizer, models, log-probabilities and the alignment algorithms built on them."""
