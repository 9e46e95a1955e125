"""Attention masks from a padding mask and causality, as boolean ``[B, 1, S_q, S_kv]`` (True = attend)."""

from __future__ import annotations

import torch
from torch import Tensor


def attention_mask_4d(mask_BK: Tensor | None, B: int, S_q: int, S_kv: int, causal: bool,
                      device: torch.device) -> Tensor | None:
    """``mask_BK``: ``[B, S_kv]`` with 1/True for real keys (past and current), or None.

    Returns None when plain ``is_causal`` (no past, no padding) or no mask at all is enough. Query rows with
    no allowed key (padding queries in a left-padded batch) attend to every key instead, so the result stays
    finite; their outputs are padding and never used.
    """
    past = S_kv - S_q
    if mask_BK is None and (not causal or S_q == 1):
        return None
    if mask_BK is None and past == 0:
        return None  # the caller uses is_causal=True
    allowed = torch.ones(B, 1, S_q, S_kv, dtype=torch.bool, device=device)
    if causal:
        q = torch.arange(S_q, device=device).unsqueeze(1) + past
        k = torch.arange(S_kv, device=device).unsqueeze(0)
        allowed = allowed & (k <= q)
    if mask_BK is not None:
        allowed = allowed & mask_BK.bool().to(device)[:, None, None, :]
        allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed


def positions_from_mask(mask_BK: Tensor, S_q: int) -> Tensor:
    """Position ids ``[B, S_q]`` of the last ``S_q`` columns, counting real tokens only (left padding)."""
    pos = mask_BK.long().cumsum(-1) - 1
    return pos.clamp_min(0)[:, -S_q:]


def sliding_window_mask(mask_B1QK: Tensor | None, S_q: int, S_kv: int, window: int, causal: bool,
                        device: torch.device) -> Tensor:
    """AND a sliding window into a ``[B, 1, S_q, S_kv]`` mask (or the plain causal one when None): query at
    cache index ``q`` sees keys ``k`` with ``q - window < k`` (Mistral; transformers' ``sliding_window``).
    Query rows left with no key (padding) attend to every key, as in :func:`attention_mask_4d`."""
    window = min(window, S_kv + 1)  # a window past the keys excludes nothing (and a huge int fits a tensor)
    q = torch.arange(S_q, device=device).unsqueeze(1) + (S_kv - S_q)
    k = torch.arange(S_kv, device=device).unsqueeze(0)
    allowed = k > q - window
    if causal:
        allowed = allowed & (k <= q)
    allowed = allowed[None, None]
    if mask_B1QK is not None:
        allowed = allowed & mask_B1QK.bool()
        allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed


def packed_mask_4d(seq_ids_BS: Tensor, causal: bool) -> Tensor:
    """``[B, 1, S, S]`` for padding-free rows holding several sequences back to back (``seq_ids_BS``: the
    sequence of every token): a token attends only to tokens of its own sequence (earlier ones if causal),
    the block-diagonal mask of packed batches (ByteTransformer, Zhai et al. 2023; FlashAttention's varlen)."""
    same = seq_ids_BS[:, None, :, None] == seq_ids_BS[:, None, None, :]
    if causal:
        S = seq_ids_BS.shape[1]
        idx = torch.arange(S, device=seq_ids_BS.device)
        same = same & (idx[None, :] <= idx[:, None])[None, None]
    return same


def positions_from_seq_ids(seq_ids_BS: Tensor) -> Tensor:
    """Position of every token within its own sequence (rows of back-to-back sequences)."""
    B, S = seq_ids_BS.shape
    idx = torch.arange(S, device=seq_ids_BS.device).expand(B, S)
    new = torch.ones_like(seq_ids_BS, dtype=torch.bool)
    new[:, 1:] = seq_ids_BS[:, 1:] != seq_ids_BS[:, :-1]
    start = torch.where(new, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - start
