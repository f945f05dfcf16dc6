"""Long-context evaluation: NIAH, RULER-style tasks, MR-NIAH, perplexity by position."""
