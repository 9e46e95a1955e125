"""Dictionary coding of ternary weights: fixed-length codewords over variable-length ternary sequences.

QMoE (Frantar & Alistarh 2023, "QMoE: Practical Sub-1-Bit Compression of Trillion-Parameter Models", sec. 4)
stores ternary expert weights as fixed-length 16-bit codewords, each standing for a variable-length run of
ternary symbols from a dictionary of frequent sequences, so that a GPU can decode every codeword
independently. That is a variable-to-fixed code; the dictionary that minimises the expected number of
codewords for a memoryless source is Tunstall's (Tunstall 1967): start from the three one-symbol sequences
and repeatedly replace the most probable sequence by its three one-symbol extensions while the dictionary
fits in ``2 ** code_bits`` entries. The sequences are the leaves of a complete ternary tree, so every
symbol stream parses greedily into dictionary entries, and decoding is a table look-up per codeword.

Symbols: 0 for a zero weight, 1 for +1, 2 for -1. The dictionary is a function of the three symbol counts
(ties broken by creation order), so the counts are all that must be stored with the codes; the decode
table is rebuilt from them. A stream is padded with zeros up to the end of its last codeword; the decoder
is told the stream's length and drops the padding, so ``decode(encode(s), len(s)) == s`` exactly.
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from moesaic.core.errors import ConfigError

SYMBOL_VALUES = (0, 1, -1)


class TunstallCode:
    """The Tunstall dictionary of ``2 ** code_bits`` (8 or 16) entries for symbol ``counts`` ``[3]``; no entry
    is longer than ``max_len`` symbols. ``table_CL`` (int8 symbols, padded) and ``len_C`` decode codeword c."""

    def __init__(self, counts: Tensor | list[int], code_bits: int = 16, max_len: int = 32):
        if code_bits not in (8, 16):
            raise ConfigError("quant.code_bits", code_bits, "must be 8 or 16 (byte or 16-bit codewords)")
        if max_len < 1:
            raise ConfigError("quant.max_len", max_len, "must be >= 1")
        c = [int(x) for x in (counts.tolist() if isinstance(counts, Tensor) else counts)]
        if len(c) != 3 or min(c) < 0:
            raise ConfigError("quant.counts", c, "must be three non-negative symbol counts")
        self.counts, self.code_bits, self.max_len = c, code_bits, max_len
        total = sum(c) + 3
        p = [(x + 1) / total for x in c]  # add-one: every symbol stays codable
        # tree: node 0 is the root; child_N3[n] = its children (-1 at a leaf)
        child: list[list[int]] = [[-1, -1, -1]]
        parent, sym, depth, prob = [-1], [-1], [0], [1.0]
        heap: list[tuple[float, int]] = []
        leaves = 1

        def expand(n: int) -> None:
            nonlocal leaves
            for s in range(3):
                child[n][s] = len(child)
                child.append([-1, -1, -1])
                parent.append(n)
                sym.append(s)
                depth.append(depth[n] + 1)
                prob.append(prob[n] * p[s])
                if depth[-1] < max_len:
                    heapq.heappush(heap, (-prob[-1], len(child) - 1))
            leaves += 2

        expand(0)
        while heap and leaves + 2 <= 2 ** code_bits:
            expand(heapq.heappop(heap)[1])
        leaf = [n for n in range(len(child)) if child[n][0] < 0]
        self.child_N3 = torch.tensor(child, dtype=torch.long)
        code = [-1] * len(child)
        for i, n in enumerate(leaf):
            code[n] = i
        self.code_N = torch.tensor(code, dtype=torch.long)
        L = max(depth[n] for n in leaf)
        rows = []
        for n in leaf:
            seq, m = [], n
            while m > 0:
                seq.append(sym[m])
                m = parent[m]
            rows.append(seq[::-1] + [0] * (L - len(seq)))
        self.table_CL = torch.tensor(rows, dtype=torch.int8)
        self.len_C = torch.tensor([depth[n] for n in leaf], dtype=torch.long)
        # the decode-on-use path: each codeword's values and which of its L columns are real
        self.values_CL = _VALUES[self.table_CL.long()]
        self.keep_CL = torch.arange(L) < self.len_C[:, None]
        self.dtype = torch.uint8 if code_bits == 8 else torch.int16

    @property
    def num_codes(self) -> int:
        return int(self.len_C.numel())

    def encode(self, sym_N: Tensor) -> Tensor:
        """Codewords (uint8, or the 16 bits of int16) of the greedy parse of symbols ``sym_N`` in {0, 1, 2}."""
        s = sym_N.reshape(-1).to(torch.long)
        N, L = s.numel(), int(self.table_CL.shape[1])
        if N == 0:
            return torch.zeros(0, dtype=self.dtype)
        s_pad = torch.cat([s, torch.zeros(L, dtype=torch.long)])
        # every start position's leaf, all positions at once (those off the parse are discarded below)
        node_P = self.child_N3[0, s_pad[:N]]
        len_P = torch.ones(N, dtype=torch.long)
        open_P = (self.code_N[node_P] < 0).nonzero().flatten()
        while open_P.numel():
            node_P[open_P] = self.child_N3[node_P[open_P], s_pad[open_P + len_P[open_P]]]
            len_P[open_P] += 1
            open_P = open_P[self.code_N[node_P[open_P]] < 0]
        step, code = len_P.tolist(), self.code_N[node_P].tolist()
        out, i = [], 0
        while i < N:
            out.append(code[i])
            i += step[i]
        codes = torch.tensor(out, dtype=torch.int32)
        return codes.to(torch.uint8) if self.code_bits == 8 else (codes - (codes >= 2 ** 15).int() * 2 ** 16).to(
            torch.int16)

    def decode(self, codes: Tensor, n: int) -> Tensor:
        """The first ``n`` symbols (int8) of codewords ``codes``."""
        c = codes.reshape(-1).to(torch.long) & (2 ** self.code_bits - 1)
        seq_CL = self.table_CL[c]
        keep_CL = torch.arange(seq_CL.shape[1]) < self.len_C[c][:, None]
        out = seq_CL[keep_CL]
        if out.numel() < n:
            raise ValueError(f"codewords decode to {out.numel()} symbols, fewer than the {n} asked for")
        return out[:n]

    def decode_values(self, codes: Tensor, n: int) -> Tensor:
        """The first ``n`` ternary values (int8 in {-1, 0, 1}) of ``codes``: :meth:`decode` mapped to values,
        by one gather of the codewords' value rows and one compaction."""
        c = codes.reshape(-1).to(torch.long) & (2 ** self.code_bits - 1)
        out = torch.masked_select(self.values_CL.index_select(0, c), self.keep_CL.index_select(0, c))
        if out.numel() < n:
            raise ValueError(f"codewords decode to {out.numel()} symbols, fewer than the {n} asked for")
        return out[:n]

    @staticmethod
    def symbols(t: Tensor) -> Tensor:
        """Ternary values {-1, 0, 1} -> symbols {2, 0, 1} (int8)."""
        return torch.where(t < 0, torch.full_like(t, 2), t).to(torch.int8)


_VALUES = torch.tensor(SYMBOL_VALUES, dtype=torch.int8)


def entropy_bits(counts: Tensor | list[int]) -> float:
    """Empirical entropy in bits per symbol of symbol ``counts`` (the memoryless lower bound of any code)."""
    c = torch.tensor([float(x) for x in (counts.tolist() if isinstance(counts, Tensor) else counts)],
                     dtype=torch.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * p.log2()).sum())
