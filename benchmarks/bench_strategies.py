"""``moesaic bench strategies CKPT`` as a script: ``python benchmarks/bench_strategies.py runs/demo``."""

import argparse
import sys

from moesaic.bench import strategies

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=strategies.__doc__)
    strategies.add_arguments(p)
    sys.exit(strategies.run(p.parse_args()))
