"""Runnable alone: ``python benchmarks/bench_train.py --shapes mixtral,fine`` (same options as
``moesaic bench train``; see ``src/moesaic/bench/train.py`` and docs/benchmarks.md)."""

import argparse
import sys

from moesaic.bench import train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench_train.py", description=train.__doc__.splitlines()[0])
    train.add_arguments(parser)
    sys.exit(train.run(parser.parse_args()))
