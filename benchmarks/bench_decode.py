"""``moesaic bench decode`` as a script: ``python benchmarks/bench_decode.py [--threads 2] [--compile]``."""

import argparse
import sys

from moesaic.bench import decode

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=decode.__doc__)
    decode.add_arguments(p)
    sys.exit(decode.run(p.parse_args()))
