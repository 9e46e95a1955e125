"""``moesaic bench offload`` as a script: ``python benchmarks/bench_offload.py --dir /tmp/bench-offload``."""

import argparse
import sys

from moesaic.bench import offload

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=offload.__doc__)
    offload.add_arguments(p)
    sys.exit(offload.run(p.parse_args()))
