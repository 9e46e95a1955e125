"""Console output of a training run: the per-step log line and a rich progress bar on a terminal."""

from __future__ import annotations

import sys
from typing import Any


class NoMetrics:
    """Metrics sink of the non-writing ranks of a distributed run."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def log_line(rec: dict[str, Any], total: int) -> str:
    worst = max((v["max_over_mean"] for v in rec.get("routing", {}).values()), default=None)
    load = f"  max/mean load {worst:.2f}" if worst is not None else ""
    return (f"step {rec['step']}/{total}  loss {rec['loss']:.4f}  aux {rec['aux_loss']:.4f}  "
            f"lr {rec['lr']:.2e}  {rec['tokens_per_s']:.0f} tok/s{load}")


class Progress:
    """A rich progress bar (step, loss, tokens/s, ETA) on a terminal; nothing otherwise."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s"),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
            self.bar.start()

    def update(self, step: int, loss: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, tps=tps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
