"""``moesaic bench serve`` as a script: ``python benchmarks/bench_serve.py [--clients 16] [--requests 64]``."""

import argparse
import sys

from moesaic.bench import serve

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=serve.__doc__)
    serve.add_arguments(p)
    sys.exit(serve.run(p.parse_args()))
