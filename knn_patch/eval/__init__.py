"""Evaluation: documents, perplexity, needles, the frontier, their tables and plots."""
