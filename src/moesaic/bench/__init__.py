"""Benchmarks behind ``moesaic bench TARGET``: one module per target with ``TARGET``, ``add_arguments(p)``
and ``run(args)``; ``moesaic.cli.bench`` discovers them (``benchmarks/`` holds runnable wrappers)."""
