"""Benchmarks and measurements: the kernel, faiss, generation, the estimators, activations."""
