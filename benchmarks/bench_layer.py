"""Runnable alone: ``python benchmarks/bench_layer.py --T 2048 --E 64:8 --dtype fp32`` (same options as
``moesaic bench layer``; see ``src/moesaic/bench/layer.py`` and docs/benchmarks.md)."""

import argparse
import sys

from moesaic.bench import layer

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench_layer.py", description=layer.__doc__.splitlines()[0])
    layer.add_arguments(parser)
    sys.exit(layer.run(parser.parse_args()))
