"""Initialisers of sparse upcycling (:mod:`moesaic.transforms.upcycle`): drop-upcycling's partial
re-initialisation and a router initialised from a data sample."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.errors import ConfigError, ConversionError
from moesaic.moe.experts.base import Experts


@torch.no_grad()
def drop_expert_(w_up_HD: Tensor, w_down_DF: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """Drop-upcycling of one expert in place: ``n`` of its F neurons (gate and up rows, down columns), drawn
    by ``gen``, re-drawn from a normal with the mean and std of each matrix before the drop. Returns the
    neuron indices. The draws depend on the shapes only, so replaying it on zeros advances ``gen`` alike."""
    F = w_down_DF.shape[1]
    idx = torch.randperm(F, generator=gen)[:n].sort().values
    rows = torch.cat([idx, idx + F]) if w_up_HD.shape[0] == 2 * F else idx
    for w, sel in ((w_up_HD, (rows, slice(None))), (w_down_DF, (slice(None), idx))):
        mean, std = float(w.float().mean()), float(w.float().std())
        shape = w[sel].shape
        w[sel] = (torch.randn(shape, generator=gen) * std + mean).to(w.dtype)
    return idx


@torch.no_grad()
def drop_reinit_(experts: Experts, fraction: float, gen: torch.Generator) -> dict[int, Tensor]:
    """Drop-upcycling (Nakamura et al. 2025): in every expert re-draw exactly ``round(fraction * F)``
    intermediate neurons (gate and up rows, down columns) from a normal with the mean and std of the
    expert's matrix before the drop (:func:`drop_expert_`, experts in order). Returns the re-drawn neuron
    indices per expert."""
    w_up_EHD: Tensor = experts.w_up_EHD  # type: ignore[assignment]
    w_down_EDF: Tensor = experts.w_down_EDF  # type: ignore[assignment]
    E, D, F = w_down_EDF.shape
    n = round(fraction * F)
    return {e: drop_expert_(w_up_EHD[e], w_down_EDF[e], n, gen) for e in range(E)}


@torch.no_grad()
def router_from_data_(model: nn.Module, cfg: Any, paths: list[str]) -> dict[str, Tensor]:
    """Router rows from data: the FFN inputs of each layer on ``cfg.router_tokens`` tokens of the text file
    ``cfg.router_data`` (the model's tokenizer), clustered by k-means (scikit-learn) into ``num_experts``
    centres; expert ``e * m + j`` gets centre e, rescaled to the norm ``router_std * sqrt(D)`` of a row of the
    random init (logits rank experts by cosine similarity to the centres). Returns ``{ffn path: weight [E*m, D]}``."""
    from sklearn.cluster import KMeans

    text_path = Path(cfg.router_data)
    if not text_path.is_file():
        raise ConfigError("upcycle.router_data", cfg.router_data, "no such text file")
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ConversionError("upcycle.router_init = 'data': the input model has no tokenizer to read the text with")
    ids = tok.encode(text_path.read_text(encoding="utf-8"))[: cfg.router_tokens]
    if len(ids) < cfg.num_experts:
        raise ConfigError("upcycle.router_data", cfg.router_data, f"has fewer tokens ({len(ids)}) than experts")
    seen: dict[str, list[Tensor]] = {p: [] for p in paths}
    mods = dict(model.named_modules())
    hooks = [mods[p].register_forward_pre_hook(lambda m, a, p=p: seen[p].append(a[0].reshape(-1, a[0].shape[-1])))
             for p in paths]
    win = int(getattr(model, "max_seq_len", 256))
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        for s in range(0, len(ids), win):
            model(torch.tensor([ids[s:s + win]], device=dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    out = {}
    for p in paths:
        x_TD = torch.cat(seen[p]).float().cpu()
        km = KMeans(n_clusters=cfg.num_experts, n_init=3, random_state=cfg.seed).fit(x_TD.numpy())
        c_ED = torch.from_numpy(km.cluster_centers_).float()
        c_ED = c_ED / c_ED.norm(dim=-1, keepdim=True).clamp_min(1e-12) * math.sqrt(c_ED.shape[1]) * cfg.router_std
        out[p] = c_ED.repeat_interleave(cfg.granularity, dim=0)
    return out
