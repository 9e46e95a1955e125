"""Runnable alone: ``python benchmarks/bench_routers.py --config configs/demo.yaml`` (same options as
``moesaic bench routers``; see ``src/moesaic/bench/routers.py`` and docs/papers.md)."""

import argparse
import sys

from moesaic.bench import routers

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench_routers.py", description=routers.__doc__.splitlines()[0])
    routers.add_arguments(parser)
    sys.exit(routers.run(parser.parse_args()))
