"""Ternary experts with dictionary coding: ``quantize_experts_(model, QuantConfig(ternary=True))``.

QMoE (Frantar & Alistarh 2023, "QMoE: Practical Sub-1-Bit Compression of Trillion-Parameter Models")
compresses MoE experts to ternary weights ``{-1, 0, +1} * scale`` and stores them with a dictionary code
whose fixed-length codewords stand for variable-length ternary runs (:mod:`moesaic.inference.tunstall`), so
the many zeros cost less than ``log2 3`` bits each. Here each group of ``group_size`` input columns (0: a whole
row) of each 3-D expert tensor gets the data-free rule of Ternary Weight Networks (Li, Zhang & Liu 2016,
eq. 11-12): threshold ``delta = t * mean|w|`` (``t = 0.7``), values ``sign(w)`` where ``|w| > delta`` else 0,
scale = mean ``|w|`` over the kept weights (the least-squares scale for that support). QMoE chooses the
ternary values data-aware with GPTQ: ``QuantConfig(ternary=True, gptq=True)`` with calibration Hessians
(:mod:`moesaic.inference.quant_gptq`).

Storage per MoE layer: one dictionary (rebuilt from the layer's three symbol counts), each expert tensor's
codewords (its own stream, so an expert decodes alone), and fp32 scales. The forward decodes only the experts
with rows (k of E at decode) and runs the fp32 backend on them, like the int8 and int4 experts of
:mod:`moesaic.inference.quant`, so it equals, bit for bit, fp32 experts holding the dequantized weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moesaic.inference.quant import _PROJ, QuantizedExperts
from moesaic.inference.tunstall import TunstallCode
from moesaic.moe.experts.stacked_ffn import FFNExperts


def ternarize_groups(w_EOI: Tensor, group_size: int, threshold: float = 0.7) -> tuple[Tensor, Tensor]:
    """Ternary values ``[E, O, I]`` (int8 in {-1, 0, 1}) and fp32 scales ``[E, O, I / g]`` by the TWN rule per
    group of ``g = group_size`` input columns (0: the whole row); computed in float64."""
    E, Out, In = w_EOI.shape
    g = group_size or In
    w = w_EOI.detach().to(torch.float64).reshape(E, Out, In // g, g)
    a = w.abs()
    keep = a > threshold * a.mean(-1, keepdim=True)
    n_EOG = keep.sum(-1)
    scale_EOG = torch.where(n_EOG > 0, (a * keep).sum(-1) / n_EOG.clamp_min(1), torch.zeros_like(n_EOG,
                                                                                             dtype=torch.float64))
    t = (torch.sign(w) * keep).to(torch.int8)
    return t.reshape(E, Out, In), scale_EOG.float()


def dequantize_ternary(t_EOI: Tensor, scale_EOG: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``t * scale`` per group, ``[E, O, I]`` in ``dtype``."""
    E, Out, In = t_EOI.shape
    G = scale_EOG.shape[-1]
    return (t_EOI.reshape(E, Out, G, In // G).to(dtype) * scale_EOG[..., None].to(dtype)).reshape(E, Out, In)


class TernaryExperts(QuantizedExperts):
    """Stacked FFN experts stored as dictionary-coded ternary values and per-group scales (module docstring).

    Buffers per projection ``p`` (``up``, ``down``): ``c3_p`` every expert's codewords, concatenated,
    ``o3_p`` ``[E + 1]`` where expert e's codewords start, ``s3_p`` ``[E, O, G]`` scales; ``counts3`` the
    layer's symbol counts (zeros, +1s, -1s) from which :attr:`code` (the dictionary) is rebuilt."""

    blockwise = False  # the dictionary code decodes whole experts

    def __init__(self, ex: FFNExperts, group_size: int, threshold: float = 0.7, code_bits: int = 16,
                 values: dict[str, tuple[Tensor, Tensor]] | None = None):
        super().__init__(ex, group_size, [2] * ex.num_experts)
        self.threshold, self.code_bits = threshold, code_bits
        self.shape = {"up": tuple(ex.w_up_EHD.shape[1:]), "down": tuple(ex.w_down_EDF.shape[1:])}
        # ``values``: ternary values and scales chosen elsewhere (GPTQ, :mod:`moesaic.inference.quant_gptq`)
        tern = values or {proj: ternarize_groups(getattr(ex, name), group_size, threshold)
                          for name, proj in _PROJ.items()}
        counts = sum(torch.bincount(TunstallCode.symbols(t).flatten().long(), minlength=3) for t, _ in tern.values())
        assert isinstance(counts, Tensor)
        self.register_buffer("counts3", counts)
        self.code = TunstallCode(counts, code_bits)
        for proj, (t_EOI, s_EOG) in tern.items():
            streams = [self.code.encode(TunstallCode.symbols(t_EOI[e])) for e in range(self.num_experts)]
            self._store(proj, streams)
            self.register_buffer(f"s3_{proj}", s_EOG)

    def _store(self, proj: str, streams: list[Tensor]) -> None:
        self.register_buffer(f"c3_{proj}", torch.cat(streams))
        self.register_buffer(f"o3_{proj}", torch.tensor([0] + [len(s) for s in streams]).cumsum(0))

    def ternary_values(self, proj: str, e: int) -> Tensor:
        """Expert e's decoded ternary ``[O, I]`` (int8) of ``proj``."""
        o, (Out, In) = self.get_buffer(f"o3_{proj}"), self.shape[proj]
        codes = self.get_buffer(f"c3_{proj}")[int(o[e]):int(o[e + 1])]
        return self.code.decode_values(codes, Out * In).reshape(Out, In)

    def _weight(self, proj: str, e: int, out: Tensor | None = None) -> Tensor:
        """Expert e's dequantized ``[O, I]`` weight of ``proj``: decoded on use (into ``out`` when given)."""
        w = dequantize_ternary(self.ternary_values(proj, e)[None], self.get_buffer(f"s3_{proj}")[e:e + 1],
                               self.dtype)[0]
        return w if out is None else out.copy_(w)

    def load_expert_state(self, e: int, state: dict[str, Tensor]) -> None:
        """Ternarize one expert's tensors and code them with the layer's dictionary."""
        for name, proj in _PROJ.items():
            t, s = ternarize_groups(state[name][None], self.group_size, self.threshold)
            o = self.get_buffer(f"o3_{proj}")
            c = self.get_buffer(f"c3_{proj}")
            streams = [c[int(o[i]):int(o[i + 1])] for i in range(self.num_experts)]
            streams[e] = self.code.encode(TunstallCode.symbols(t[0]))
            self._store(proj, streams)
            self.get_buffer(f"s3_{proj}")[e].copy_(s[0])

    def num_weights(self) -> int:
        return self.num_experts * sum(o * i for o, i in self.shape.values())

    def bits_per_weight(self) -> float:
        """Stored bits (codewords, offsets, scales, counts) per expert weight."""
        return 8 * self.nbytes() / self.num_weights()

    def code_bits_per_weight(self) -> float:
        """Bits of the codewords alone per weight (the dictionary code's rate)."""
        n = sum(self.get_buffer(f"c3_{p}").numel() for p in self.shape)
        return n * self.code_bits / self.num_weights()

    def zero_fraction(self) -> float:
        c = self.get_buffer("counts3")
        return float(c[0]) / float(c.sum())

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, ternary, group_size={self.group_size or 'row'}, "
                f"threshold={self.threshold}, code_bits={self.code_bits}, bits/weight={self.bits_per_weight():.3f}")
