"""Metrics sinks: ``OUT/metrics.jsonl`` (one JSON object per line, always with ``step`` and ``loss``),
TensorBoard when installed, and per-layer routing statistics from ``MoELayer.last_stats``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moesaic.core.errors import OutputWriteError
from moesaic.moe.api import moe_layers


class RoutingStats:
    """Accumulates expert loads, drops and router entropy over the micro-batches of one step."""

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        self.reset()

    def reset(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self.dropped: dict[str, int] = {}
        self.entropy: dict[str, list[tuple[float, int]]] = {}
        self.aux: dict[str, dict[str, list[float]]] = {}  # layer -> weighted aux loss name -> per micro-batch

    @torch.no_grad()
    def update(self) -> None:
        for layer in self.layers:
            s = layer.last_stats
            if not s:
                continue
            n = layer.layer_name
            c = s["tokens_per_expert"].detach().to("cpu", torch.float64)
            self.counts[n] = self.counts[n] + c if n in self.counts else c
            self.dropped[n] = self.dropped.get(n, 0) + int(s.get("dropped", 0))
            if "entropy" in s:
                self.entropy.setdefault(n, []).append((float(s["entropy"]), int(s.get("tokens", 1))))
            for name, v in layer.aux_losses.items():
                self.aux.setdefault(n, {}).setdefault(name, []).append(float(v.detach()))

    def summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for n, c in self.counts.items():
            mean = float(c.mean())
            ent = self.entropy.get(n, [])
            tot = sum(w for _, w in ent)
            out[n] = {"max_load": float(c.max()), "mean_load": mean,
                      "max_over_mean": float(c.max()) / mean if mean > 0 else 0.0,
                      "cv": float(c.std(unbiased=False)) / mean if mean > 0 else 0.0,
                      "dropped": self.dropped.get(n, 0),
                      "entropy": sum(e * w for e, w in ent) / tot if tot else float("nan"),
                      **{f"aux_{k}": sum(v) / len(v) for k, v in self.aux.get(n, {}).items()},
                      "load": [int(x) for x in c.round().tolist()]}
        return out


class MetricsWriter:
    def __init__(self, out_dir: Path, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard not installed or broken: jsonl only
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they are recomputed)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:
                continue  # a line cut by a kill
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # disk full, read-only folder: one typed line naming the folder
            raise OutputWriteError(f"cannot write {self.path.name} to {self.path.parent}: {e.strerror or e}") \
                from None
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
                elif k == "routing":
                    for layer, st in v.items():
                        for sk, sv in st.items():
                            if sk == "load":  # tokens per expert: a histogram over expert ids
                                self.tb.add_histogram(f"routing/{layer}/load", torch.tensor(
                                    [e for e, n in enumerate(sv) for _ in range(int(n))], dtype=torch.float32),
                                    step, bins=torch.arange(len(sv) + 1, dtype=torch.float32).numpy())
                            else:
                                self.tb.add_scalar(f"routing/{layer}/{sk}", sv, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
