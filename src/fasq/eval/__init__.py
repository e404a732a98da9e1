"""Evaluation: data, perplexity, zero-shot (lm-eval), speed, baselines."""
