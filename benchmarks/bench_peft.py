"""``moesaic bench peft`` as a script: ``python benchmarks/bench_peft.py``."""

import argparse
import sys

from moesaic.bench import peft

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=peft.__doc__)
    peft.add_arguments(p)
    sys.exit(peft.run(p.parse_args()))
