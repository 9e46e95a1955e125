"""``moesaic bench ep`` as a script: ``python benchmarks/bench_ep.py [--tokens 256 2048] [--world 2 4]``."""

import argparse
import sys

from moesaic.bench import ep

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=ep.__doc__)
    ep.add_arguments(p)
    sys.exit(ep.run(p.parse_args()))
