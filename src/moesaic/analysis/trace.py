"""Run a model over passages and keep what its routers did, token by token (``moesaic analyze``).

Routing is read through the layers' public routing hook (:class:`~moesaic.analysis.recorder.RoutingRecorder`);
nothing in the model is patched. Passages are scored in right-padded batches (padding rows dropped), then
a few are continued with greedy decoding (decoder LMs), so prefill and decode usage can be compared.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moesaic.analysis.recorder import RoutingRecorder
from moesaic.analysis.sample import Passage
from moesaic.core.errors import ConfigError
from moesaic.moe.layer import MoELayer

PREFILL, DECODE = 0, 1


@dataclasses.dataclass
class LayerTrace:
    """One MoE layer's routing over every recorded token: ``ids_TK`` expert ids (-1 = none), ``w_TK``
    weights, ``conf_T2`` router top-1 probability and margin (NaN without probabilities)."""

    name: str
    num_experts: int
    top_k: int
    ids_TK: np.ndarray
    w_TK: np.ndarray
    conf_T2: np.ndarray
    dropped: int


@dataclasses.dataclass
class Trace:
    """Token ids, phase (:data:`PREFILL` / :data:`DECODE`) and labels (``meta[name][t]``) of every token,
    each MoE layer's :class:`LayerTrace` in model order, one batch's input to each layer, and the scored
    batches (``input_ids``, ``attention_mask``) to run the model on again."""

    layers: list[LayerTrace]
    token_ids: np.ndarray
    phase: np.ndarray
    meta: dict[str, np.ndarray]
    layer_inputs: dict[str, Tensor]
    batches: list[tuple[Tensor, Tensor]] = dataclasses.field(default_factory=list)


def moe_layers_of(model: nn.Module, where: str) -> list[tuple[str, MoELayer]]:
    """``(name, layer)`` of every MoE layer; :class:`ConfigError` when the model has none."""
    found = [(n or "moe", m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
    if not found:
        raise ConfigError("checkpoint", where, "has no MoE layers: nothing to analyze (a dense model?)")
    return found


@torch.no_grad()
def record(model: nn.Module, passages: list[Passage], *, where: str = "model", batch_size: int = 16,
           max_len: int = 128, decode_prompts: int = 8, prompt_len: int = 16, decode_tokens: int = 8) -> Trace:
    """Score ``passages`` (truncated to ``max_len`` tokens) and greedily continue ``decode_prompts`` of them
    by ``decode_tokens`` tokens (models with ``generate``), recording every MoE layer."""
    layers = moe_layers_of(model, where)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ConfigError("checkpoint", where, "has no tokenizer: analyze needs one to read text")
    if not passages:
        raise ConfigError("--data", "<empty>", "gave no passages")
    max_len = min(max_len, int(getattr(model, "max_seq_len", max_len)))
    keep = [(p, ids) for p, ids in zip(passages, (tok.encode(p.text)[:max_len] for p in passages)) if ids]
    if not keep:
        raise ConfigError("--data", "<passages>", "every passage is empty after tokenization")
    model.eval()
    device = next(model.parameters()).device
    rows: list[np.ndarray] = []  # per forward: indices of real (unpadded) rows
    tokens: list[int] = []
    phase: list[int] = []
    labels: list[dict[str, str]] = []
    inputs: dict[str, Tensor] = {}
    batches: list[tuple[Tensor, Tensor]] = []
    grab = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, args[0].detach()))
            for n, m in layers]
    try:
        with RoutingRecorder(model, top_k=0) as rec:
            for i in range(0, len(keep), batch_size):
                chunk = keep[i:i + batch_size]
                M = max(len(ids) for _, ids in chunk)
                ids_BM = torch.zeros(len(chunk), M, dtype=torch.long)
                mask_BM = torch.zeros(len(chunk), M, dtype=torch.long)
                for b, (p, ids) in enumerate(chunk):
                    ids_BM[b, :len(ids)] = torch.tensor(ids)
                    mask_BM[b, :len(ids)] = 1
                    tokens += ids
                    phase += [PREFILL] * len(ids)
                    labels += [p.meta] * len(ids)
                model(ids_BM.to(device), attention_mask=mask_BM.to(device))
                batches.append((ids_BM, mask_BM))
                rows.append(np.flatnonzero(mask_BM.reshape(-1).numpy()))
                for h in grab:
                    h.remove()
                grab = []
            if hasattr(model, "generate"):
                for p, ids in keep[:decode_prompts]:
                    prompt = ids[:prompt_len]
                    before = len(rec.records[layers[0][0]])
                    gen: Any = model.generate
                    out = gen(torch.tensor([prompt], device=device), max_new_tokens=decode_tokens, temperature=0.0)
                    new = out[0, len(prompt):].tolist()
                    steps = len(rec.records[layers[0][0]]) - before
                    for s in range(steps):  # step 0 reads the prompt, step s > 0 the token generated before it
                        step_tokens = prompt if s == 0 else [new[s - 1]]
                        rows.append(np.arange(len(step_tokens)))
                        tokens += step_tokens
                        phase += [PREFILL if s == 0 else DECODE] * len(step_tokens)
                        labels += [p.meta] * len(step_tokens)
    finally:
        for h in grab:
            h.remove()
    out_layers = []
    for name, layer in layers:
        recs, conf = rec.records[name], rec.confidence[name]
        K = max(ids.shape[1] for ids, _ in recs)
        pad = [(np.pad(ids.numpy(), ((0, 0), (0, K - ids.shape[1])), constant_values=-1),
                np.pad(w.float().numpy(), ((0, 0), (0, K - w.shape[1])))) for ids, w in recs]
        out_layers.append(LayerTrace(
            name, layer.num_experts, layer.top_k,
            np.concatenate([ids[r] for (ids, _), r in zip(pad, rows)]),
            np.concatenate([w[r] for (_, w), r in zip(pad, rows)]),
            np.concatenate([c.numpy()[r] for c, r in zip(conf, rows)]), rec.dropped[name]))
    keys = sorted({k for m in labels for k in m})
    meta = {k: np.array([m.get(k, "") for m in labels], dtype=object) for k in keys}
    return Trace(out_layers, np.array(tokens, dtype=np.int64), np.array(phase, dtype=np.int8), meta, inputs,
                 batches)
