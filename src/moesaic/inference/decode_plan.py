"""A batch-1 decode step with the modules' ops and without their calls (``DecodePlan``; docs/inference.md).

At batch 1 a decode step of the reference model runs about 400 small ops around 2 ms of matrix-vector
products, and the Python between the ops (``nn.Module.__call__``, each forward's general branches, reading
parameters through ``nn.Module.__getattr__``) costs as much as many of the ops (docs/benchmarks.md, "Decode").
A :class:`DecodePlan` is made once per :class:`~moesaic.inference.session.DecodeSession` for a decoder LM
(``model.model`` a :class:`~moesaic.models.transformer.TransformerBody`, ``model.lm_head`` an ``nn.Linear``):
it records the modules of every block and, for one row and one new token without a padding mask, runs the
ops of their forwards in the same order on the same tensors (so the logits are bitwise those of the module
path, ``tests/inference/test_decode_plan.py``):

* embedding, RMSNorm (:func:`~moesaic.models.norms.rms_norm`), residual adds, final norm and LM head;
* multi-head / grouped-query attention (``mha`` without q/k norm or sliding window, plain ``nn.Linear``
  projections): projections, the shared RoPE angles, the static cache update, ``scaled_dot_product_attention``;
* MoE layers whose one-token path applies (:meth:`MoELayer._one_token_ffn`: a top-k router, the sort
  dispatcher, plain FFN experts on the CPU): the router's choice, the chosen experts, the lazy statistics.

The matrix-vector products (projections, LM head, experts) go through
:func:`~moesaic.core.split_linear.split_linear`, bitwise ``F.linear`` on every core.

Every step first checks, in one pass over the recorded modules (about 10 us), what the module path would decide
differently: a module replaced (LoRA or quantized projections, offloaded experts, a dropped layer), a forward
hook or pre-hook on a module the module path calls (globally registered ones included), a patched or compiled
forward, autograd or autocast on, tracing. A replaced module makes the plan again; a block part that does
not qualify (a hook on its attention, a routing hook or training mode on its MoE layer, other attention kinds,
a dense FFN) is called as a module, and anything that concerns the whole step runs the module path.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.core.split_linear import global_hooks, plain, split_linear
from moesaic.inference.kv_cache import CacheView
from moesaic.models.attention import MultiHeadAttention, repeat_kv
from moesaic.models.norms import RMSNorm, rms_norm
from moesaic.models.rope import RotaryAngles, rotate
from moesaic.models.transformer import TransformerBody, TransformerLayer
from moesaic.moe.experts.stacked_ffn import FFNExperts
from moesaic.moe.layer import MoELayer

#: Per model body, the rotary angles of every position a plan has decoded at (``RotaryAngles``, filled by the layers
#: on first use, keyed by position and device): a later step at that position (the next request) reads them instead of
#: computing them again, about a dozen small ops per step. At most the body's ``max_seq_len`` positions.
_ROPE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, torch.device], RotaryAngles]] = weakref.WeakKeyDictionary()


class _Block:
    """One :class:`TransformerLayer`: its parts, and what the plan computes of them without module calls."""

    def __init__(self, layer: TransformerLayer):
        self.layer = layer
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.attn, self.mlp = a, m = layer.self_attn, layer.mlp
        self.inline_norms = type(self.norm1) is RMSNorm and type(self.norm2) is RMSNorm
        #: (container, key, object) whose identity the step checks: a replaced module or weight makes the plan again
        self.slots: list[tuple[Mapping[str, object], str, object]] = [
            (layer._modules, "input_layernorm", self.norm1), (layer._modules, "post_attention_layernorm", self.norm2),
            (layer._modules, "self_attn", a), (layer._modules, "mlp", m)]
        self.projs: tuple[nn.Linear, ...] = ()
        self.weights: tuple[Tensor | None, ...] = ()
        projs = (a.q_proj, a.k_proj, a.v_proj, a.o_proj) if type(a) is MultiHeadAttention else ()
        if projs and all(type(p) is nn.Linear for p in projs):
            self.projs = projs
            for name, p in zip(("q_proj", "k_proj", "v_proj", "o_proj"), projs, strict=True):
                self.slots += [(a._modules, name, p), (p._parameters, "weight", p.weight),
                               (p._parameters, "bias", p.bias)]
                self.weights += (p.weight, p.bias)
            self.heads = (a.num_heads, a.num_kv_heads, a.head_dim)
        self.moe = m if type(m) is MoELayer and isinstance(m.experts, FFNExperts) else None
        self.parts = self.moe._one_token_parts() if self.moe is not None else None
        self.experts = cast(FFNExperts, m.experts) if self.parts is not None else None

    def inline_attention(self) -> bool:
        a = self.attn
        return bool(self.projs) and not (a.cfg.qk_norm or a.cfg.sliding_window is not None) and plain(a) \
            and all(plain(p) for p in self.projs)

    def forward(self, h_BSD: Tensor, ids_11: Tensor, pos_11: Tensor, view: CacheView, rope: RotaryAngles) -> Tensor:
        """:meth:`TransformerLayer.forward` for one token of one row without a padding mask."""
        n1, n2, a, m = self.norm1, self.norm2, self.attn, self.mlp
        inline_norms = self.inline_norms and plain(n1) and plain(n2)
        x_BSD = rms_norm(h_BSD, n1._parameters["weight"], n1.eps) if inline_norms else n1(h_BSD)  # type: ignore[arg-type]
        if self.inline_attention():  # MultiHeadAttention.forward, S = 1, no mask
            H, Hkv, d = self.heads
            wq, bq, wk, bk, wv, bv, wo, bo = self.weights
            q_BSHd = split_linear(x_BSD, wq, bq).view(1, 1, H, d)  # type: ignore[arg-type]
            k_BSHd = split_linear(x_BSD, wk, bk).view(1, 1, Hkv, d)  # type: ignore[arg-type]
            v_BHSd = split_linear(x_BSD, wv, bv).view(1, 1, Hkv, d).transpose(1, 2)  # type: ignore[arg-type]
            cos, ssin = rope.rotation(a.rotary_emb, q_BSHd.dtype)
            q_BHSd = rotate(q_BSHd, cos, ssin).transpose(1, 2)
            k_BHSd = rotate(k_BSHd, cos, ssin).transpose(1, 2)
            k_BHSd, v_BHSd = view.update(a.layer_idx, k_BHSd, v_BHSd)
            o_BHSd = F.scaled_dot_product_attention(q_BHSd, repeat_kv(k_BHSd, H // Hkv), repeat_kv(v_BHSd, H // Hkv),
                                                    attn_mask=None, is_causal=False)
            a_BSD = split_linear(o_BHSd.transpose(1, 2).reshape(1, 1, H * d), wo, bo)  # type: ignore[arg-type]
        else:
            a_BSD = a(x_BSD, pos_11, None, view, rope=rope) if getattr(a, "accepts_rope", False) else \
                a(x_BSD, pos_11, None, view)
        h_BSD = h_BSD + a_BSD
        x_BSD = rms_norm(h_BSD, n2._parameters["weight"], n2.eps) if inline_norms else n2(h_BSD)  # type: ignore[arg-type]
        moe = self.moe
        y_BSD: Tensor | None = None
        if (moe is not None and moe.__dict__.get("_parts") is self.parts is not None and not moe.training
                and not moe._routing_hooks and plain(moe)):  # MoELayer.forward would take its one-token path
            router, experts = self.parts[0], self.experts
            assert experts is not None
            x_TD = x_BSD.reshape(1, moe.d_model)
            ffn = experts.one_token_ffn(x_TD, router.top_k)
            if ffn is not None:
                y_BSD = moe._one_token_ffn(x_TD, router, ffn, experts.one_token_views(ffn)).reshape(1, 1, moe.d_model)
        if y_BSD is None:
            y_BSD = m(x_BSD, mask=None, token_ids=ids_11) if isinstance(m, MoELayer) else m(x_BSD)
        return h_BSD + y_BSD


class DecodePlan:
    """The decode step of a decoder LM for one row and one token; see the module docstring."""

    def __init__(self, model: nn.Module):
        body, head = model._modules["model"], model._modules["lm_head"]
        assert isinstance(body, TransformerBody) and isinstance(head, nn.Linear)
        self.model, self.body, self.head = model, body, head
        self.embed = body.embed_tokens
        self.blocks = [_Block(layer) for layer in body.layers]  # type: ignore[arg-type]
        self.slots: list[tuple[Mapping[str, object], str, object]] = [
            (model._modules, "model", body), (model._modules, "lm_head", head),
            (body._modules, "embed_tokens", self.embed), (body._modules, "layers", body.layers)]
        self.slots += [(body.layers._modules, str(i), b.layer) for i, b in enumerate(self.blocks)]
        for b in self.blocks:
            self.slots += b.slots
        self._rope = _ROPE.setdefault(body, {})
        #: modules whose call the step replaces by their forward's ops
        self.calls: list[nn.Module] = [body, self.embed, head, *(b.layer for b in self.blocks)]

    @staticmethod
    def build(model: nn.Module) -> DecodePlan | None:
        """A plan for ``model``, or None when it is not a decoder LM of :class:`TransformerBody` blocks."""
        body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
        if type(body) is not TransformerBody or type(head) is not nn.Linear or not body.causal:
            return None
        if type(body.embed_tokens) is not nn.Embedding or body.embed_tokens.max_norm is not None:
            return None
        if any(type(lyr) is not TransformerLayer for lyr in body.layers):
            return None
        return DecodePlan(model)

    def current(self) -> bool:
        """Whether the recorded modules and weights are still the model's (else make the plan again)."""
        return (all(c.get(k) is v for c, k, v in self.slots) and len(self.body.layers) == len(self.blocks)
                and all(b.moe.__dict__.get("_parts", False) is b.parts for b in self.blocks if b.moe is not None))

    def applies(self) -> bool:
        """Whether this step may skip the calls of body, blocks, embedding and head (checked every step)."""
        return not (torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or global_hooks()
                    or torch._C._get_tracing_state() is not None or not all(plain(m) for m in self.calls))

    def step(self, ids_11: Tensor, pos_11: Tensor, position: int, view: CacheView) -> Tensor:
        """Logits ``[1, V]`` of the next token after ``ids_11`` at position ``pos_11`` (``[1, 1]`` each, ``position``
        its value); the caller has checked :meth:`applies` and :meth:`current`. Bitwise
        ``head(body(ids_11, None, pos_11, view)[:, -1])``."""
        body = self.body
        emb = self.embed
        h_BSD = F.embedding(ids_11, emb._parameters["weight"], emb.padding_idx, None, emb.norm_type,  # type: ignore[arg-type]
                            emb.scale_grad_by_freq, emb.sparse)
        rope = self._rope.get((position, pos_11.device))  # the angles once for all layers, as TransformerBody.forward
        if rope is None:
            rope = RotaryAngles(pos_11)
            if position < body.cfg.max_seq_len:
                self._rope[(position, pos_11.device)] = rope
        for b in self.blocks:
            h_BSD = b.forward(h_BSD, ids_11, pos_11, view, rope)
        view.advance(1)
        h_BSD = self._norm(body.norm, h_BSD)
        return split_linear(h_BSD[:, -1], self.head._parameters["weight"], self.head._parameters["bias"])  # type: ignore[arg-type]

    @staticmethod
    def _norm(n: nn.Module, h: Tensor) -> Tensor:
        if type(n) is RMSNorm and plain(n):
            return rms_norm(h, n._parameters["weight"], n.eps)  # type: ignore[arg-type]
        out: Tensor = n(h)
        return out
