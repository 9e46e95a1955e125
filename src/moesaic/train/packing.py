"""Padding-free batches: variable-length sequences back to back in rows, so no compute goes to padding
(ByteTransformer, Zhai et al. 2023; "packing with cross-sequence masking"). Attention is block-diagonal by
sequence and positions restart per sequence (``seq_ids`` in :class:`~moesaic.models.transformer.TransformerBody`),
and the MoE layer sees only real tokens, so for a router whose choice depends on the token alone (dropless
token choice: ``topk``, ``switch`` without capacity, ``top_p``, ``hash``, ...) every output equals the padded
batch's. Routers that choose across the batch (expert choice, Soft MoE's slots) or a capacity limit computed
from the padded token count see a different batch and differ; stochastic routers in training draw their noise
per row. Balance losses are batch statistics: they see the same real tokens, in another order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moesaic.core.errors import ConfigError
from moesaic.train.loss import IGNORE_INDEX


def pack(seqs: Sequence[Sequence[int]], row_len: int | None = None) -> dict[str, Tensor]:
    """Sequences back to back in rows of ``row_len`` tokens (default: one row of all of them), first fit: each
    sequence goes to the first row with room for it (in sequence order within a row), else a new row.

    Returns ``input_ids``, ``seq_ids`` (sequence index of every token, ``-1`` on the padded tail of a row),
    ``labels`` (next token within its sequence, ``-100`` at each sequence's last token and on padding) and,
    when a row has a padded tail, ``attention_mask``."""
    lengths = [len(s) for s in seqs]
    if not seqs or min(lengths) == 0:
        raise ConfigError("sequences", lengths, "must be at least one, each with at least one token")
    L = row_len or sum(lengths)
    if max(lengths) > L:
        raise ConfigError("row_len", L, f"must hold the longest sequence ({max(lengths)} tokens)")
    rows: list[list[int]] = []
    used: list[int] = []
    for i, n in enumerate(lengths):
        r = next((r for r, u in enumerate(used) if u + n <= L), None)
        if r is None:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        used[r] += n
    R = len(rows)
    ids = torch.zeros(R, L, dtype=torch.long)
    sid = torch.full((R, L), -1, dtype=torch.long)
    lab = torch.full((R, L), IGNORE_INDEX, dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for i in members:
            s = torch.as_tensor(list(seqs[i]), dtype=torch.long)
            n = len(s)
            ids[r, pos:pos + n], sid[r, pos:pos + n] = s, i
            lab[r, pos:pos + n - 1] = s[1:]
            pos += n
    out = {"input_ids": ids, "seq_ids": sid, "labels": lab}
    if bool((sid < 0).any()):
        out["attention_mask"] = (sid >= 0).long()
    return out


def unpack(x_RL: Tensor, seq_ids_RL: Tensor, n: int | None = None) -> list[Tensor]:
    """Per sequence (in index order), its rows of ``x_RL`` (``[R, L, ...]``): the inverse of :func:`pack`."""
    count = int(seq_ids_RL.max()) + 1 if n is None else n
    flat_x = x_RL.reshape(-1, *x_RL.shape[2:])
    flat_s = seq_ids_RL.reshape(-1)
    return [flat_x[flat_s == i] for i in range(count)]
