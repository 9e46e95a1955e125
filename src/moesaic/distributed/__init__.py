"""Parallelism applied from outside the model (expert parallelism, data parallelism, placement)."""
