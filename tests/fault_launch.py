"""Test-side launcher: install an in-process fault (moesaic.train.faults), then run the moesaic CLI.

    python tests/fault_launch.py kill checkpoint.before_publish 20 -- train CONFIG --out DIR
    python tests/fault_launch.py fail step.begin 0 --rank 1 -- train CONFIG --out DIR   (under torchrun)

``kill``: SIGKILL this process when the code passes the point at that step (a crash inside a save).
``fail``: raise at the point at that step, on ``--rank`` only (a failing rank of a distributed run).
"""

import argparse
import os
import signal
import sys


def main() -> int:
    sep = sys.argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("action", choices=["kill", "fail"])
    p.add_argument("point")
    p.add_argument("step", type=int)
    p.add_argument("--rank", type=int, default=None)
    a = p.parse_args(sys.argv[1:sep])

    from moesaic.cli import main as cli_main
    from moesaic.train import faults

    def callback(step: int, rank: int = 0) -> None:
        if step != a.step or (a.rank is not None and rank != a.rank):
            return
        if a.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"rank {rank} fails at step {step} (fault injected by the test at {a.point})")

    faults.install(a.point, callback)
    return cli_main(sys.argv[sep + 1:])


if __name__ == "__main__":
    sys.exit(main())
