"""Sparse upcycling: turn the dense FFNs of a trained model into MoE layers whose experts start as copies.

* Copy upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense
  Checkpoints", ICLR): every expert is a copy of the dense FFN; with top-k weights that sum to one
  (``normalization: renorm``) the upcycled layer computes exactly the dense FFN at step 0, whatever the
  router says. The router starts ``random`` (its own init), ``zero`` (uniform scores) or from ``data``:
  the k-means centres of the layer's inputs on a text sample.
* Drop-upcycling (Nakamura et al. 2025, "Drop-Upcycling: Training Sparse Mixture of Experts with Partial
  Re-initialization", ICLR): in every expert, exactly ``round(drop_fraction * F)`` intermediate neurons
  (rows of gate/up, columns of down) are re-drawn from a normal with the mean and std of the source matrix.
* Fine-grained upcycling (He et al. 2024, "Upcycling Large Language Models into Mixture of Experts"; the
  segmentation of Dai et al. 2024, DeepSeekMoE): ``granularity: m`` splits each copy into m experts of width
  F/m (``m * E`` experts, ``m * k`` active); their down projections are scaled by m, so the zero router
  (which ties and picks whole copies) is exact at step 0.
* Several inputs (same architecture): expert e copies the FFN of input ``e % n``. CLIP-MoE's multiplet
  upcycling (Zhang et al. 2024, "CLIP-MoE: Towards Building Mixture of Experts for CLIP with Diversified
  Multiplet Upcycling") keeps the non-FFN weights of the first input (``non_expert: first``); BAM (Zhang et
  al. 2024, "BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts") and
  Branch-Train-MiX average them (``non_expert: average``). BAM's attention upcycling (``attention: moa``):
  the attention of the chosen layers becomes a mixture of attention whose experts are the inputs' attentions
  (:mod:`moesaic.transforms.upcycle_attention`).
* FFNs with biases (BERT-family encoders, ``bert_encoder`` / Hugging Face BERT, DistilBERT, MiniLM) become
  ``mlp_bias`` experts; the copies keep both biases, so step 0 is exact as well.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from moesaic.core.config import Section, require, rule, validate_tree
from moesaic.core.errors import ConversionError
from moesaic.models.attention_moa import MoAAttentionConfig
from moesaic.models.transformer import LayerOverride, TransformerConfig
from moesaic.moe.api import name_layers
from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.experts.base import ExpertsConfig
from moesaic.moe.layer import MoEConfig, MoELayer
from moesaic.moe.routing.base import RouterConfig
from moesaic.train.lazy_load import lazy_state, saved_names
from moesaic.transforms.convert import FilterFn, converter
from moesaic.transforms.upcycle_attention import build_moa_layer, check_attention, moa_config
from moesaic.transforms.upcycle_init import drop_reinit_, router_from_data_
from moesaic.transforms.upcycle_stream import Drop, Source, average_lazily_, replay_drop_, streamed_layer


@dataclasses.dataclass
class UpcycleConfig(Section):
    """``moesaic convert upcycle IN... OUT --set key=value``; defaults: 8 copies, top-2, renormalised."""

    num_experts: int = rule(8, ge=1)
    top_k: int = rule(2, ge=1)
    granularity: int = rule(1, ge=1)
    normalization: Literal["renorm", "none", "softmax_topk"] = "renorm"
    router_init: Literal["random", "zero", "data"] = "random"
    router_std: float = rule(0.02, ge=0.0)
    router_data: str = ""
    router_tokens: int = rule(4096, ge=1)
    aux_loss_coef: float = rule(0.01, ge=0.0)
    drop_fraction: float = rule(0.0, ge=0.0, le=1.0)
    seed: int = 0
    layers: list[int] | None = None
    non_expert: Literal["first", "average"] = "first"
    attention: Literal["keep", "moa"] = "keep"
    #: BAM (attention: moa): attention experts (null: one per input), active ones (null: all, soft routing),
    #: shared keys/values (BAM's KV-sharing variant), router init (null: router_init's).
    attention_experts: int | None = rule(None, ge=1)
    attention_top_k: int | None = rule(None, ge=1)
    attention_shared_kv: bool = False
    attention_router_init: Literal["random", "zero"] | None = None
    stream: bool = False  # inputs read and expert stacks made only while the checkpoint is written (upcycle_stream.py)

    def validate(self, path: str) -> None:
        require(self.top_k <= self.num_experts, f"{path}.top_k", self.top_k,
                f"must be <= num_experts ({self.num_experts})")
        require(self.router_init != "data" or bool(self.router_data), f"{path}.router_data", self.router_data,
                "router_init: data needs a text file to sample tokens from")
        require(not (self.stream and self.router_init == "data"), f"{path}.stream", self.stream,
                "router_init: data runs the model on a text sample, which needs it in memory: use stream: false")
        require(not (self.stream and self.attention == "moa"), f"{path}.stream", self.stream,
                "attention: moa is not streamed: use stream: false")
        require(self.attention != "moa" or self.router_init != "data" or self.attention_router_init is not None,
                f"{path}.attention_router_init", self.attention_router_init,
                "router_init: data initialises FFN routers only: set attention_router_init (random or zero)")


def _moe_config(cfg: UpcycleConfig, ffn: DenseFFN) -> MoEConfig:
    # BERT-family FFNs have biases: mlp_bias experts (moesaic.moe.experts.biased)
    experts = ExpertsConfig.for_kind("mlp_bias" if ffn.bias else "glu" if ffn.gated else "mlp")
    experts.activation = ffn.activation  # type: ignore[attr-defined]
    router = RouterConfig.for_kind("topk")
    router.normalization, router.aux_loss_coef = cfg.normalization, cfg.aux_loss_coef  # type: ignore[attr-defined]
    router.init_std = cfg.router_std
    return MoEConfig(d_ff=ffn.d_ff, num_experts=cfg.num_experts, top_k=cfg.top_k, granularity=cfg.granularity,
                     router=router, experts=experts)


def dense_ffns(model: nn.Module, filter_fn: FilterFn | None, layers: list[int] | None
               ) -> tuple[Any, list[tuple[int, str, DenseFFN]]]:
    """(the Transformer body, its selected dense FFNs as (layer index, module path, FFN))."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "layers", None), nn.ModuleList)
             and len(m.layers) and all(hasattr(b, "mlp") for b in m.layers)]
    if not found:
        raise ConversionError(f"{type(model).__name__}: no FFN found (upcycle reads Transformer bodies with "
                              "layers.N.mlp dense FFNs: decoder_lm, encoder_classifier, bert_encoder, Hugging Face "
                              "Llama, Mistral, Qwen2, BERT)")
    prefix, body = found[0]
    out = []
    for i, layer in enumerate(body.layers):
        path = f"{prefix + '.' if prefix else ''}layers.{i}.mlp"
        if not isinstance(layer.mlp, DenseFFN) or (layers is not None and i not in layers):
            continue
        if filter_fn is None or filter_fn(path, layer.mlp):
            out.append((i, path, layer.mlp))
    if not out:
        raise ConversionError(f"{type(model).__name__}: no dense FFN found to upcycle (every selected layer "
                              "already is an MoE layer, or the layer filter kept none)")
    return body, out


def _ffn_kind(cfg: dict[str, Any]) -> str:
    act = cfg.get("activation")
    return f"{act} gated ({'SwiGLU' if act == 'silu' else 'GeGLU'})" if cfg.get("gated", False) else f"{act} MLP"


def _check_same(model: nn.Module, others: Sequence[nn.Module]) -> None:
    mcfg: Any = model.cfg
    ref = dataclasses.asdict(mcfg)
    for j, o in enumerate(others, 1):
        ocfg: Any = getattr(o, "cfg", None)
        other = dataclasses.asdict(ocfg) if dataclasses.is_dataclass(ocfg) and not isinstance(ocfg, type) else {}
        if (other.get("activation"), other.get("gated")) != (ref.get("activation"), ref.get("gated")):
            raise ConversionError(f"input {j + 1}: FFN mismatch, {_ffn_kind(other)} vs {_ffn_kind(ref)} in input 1 "
                                  "(SwiGLU vs GELU): the experts of one layer share one activation")
        diff = sorted(k for k in ref.keys() | other.keys() if ref.get(k) != other.get(k))
        if diff:
            raise ConversionError(f"input {j + 1} does not have the architecture of input 1 (model.{diff[0]}: "
                                  f"{other.get(diff[0])!r} vs {ref.get(diff[0])!r}); several inputs must be "
                                  "fine-tuned copies of one dense model")


@torch.no_grad()
def _average_non_expert_(model: nn.Module, others: Sequence[nn.Module]) -> None:
    """BAM / Branch-Train-MiX: the non-FFN parameters become the mean over the inputs (tied tensors once;
    a streamed input's when they are written)."""
    keep = saved_names(model)
    names = [n for n, t in model.state_dict().items() if n in keep and ".mlp." not in n and t.is_floating_point()]
    if any(model.state_dict()[n].is_meta for n in names):
        average_lazily_(model, others, names)
        return
    states = [o.state_dict() for o in others]
    for name in names:
        t = model.state_dict()[name]
        t.copy_(torch.stack([t, *(s[name].to(t.dtype) for s in states)]).mean(0))


@torch.no_grad()
def segment_state(ffns: Sequence[DenseFFN], i: int, granularity: int) -> dict[str, torch.Tensor]:
    """Expert ``i = e * m + j``: segment j (neurons ``[j F/m, (j+1) F/m)``) of ``ffns[e % n]``, its down
    projection scaled by m (m = 1: a plain copy)."""
    m = granularity
    e, j = divmod(i, m)
    src = ffns[e % len(ffns)]
    Fm = src.d_ff // m
    seg = slice(j * Fm, (j + 1) * Fm)
    up = src.up_proj.weight[seg]
    w_up_HD = torch.cat([src.gate_proj.weight[seg], up]) if src.gated else up
    state = {"w_up_EHD": w_up_HD, "w_down_EDF": src.down_proj.weight[:, seg] * m}
    if src.bias:  # the weights of the chosen experts sum to one: b_down is not scaled
        state["b_up_EF"] = src.up_proj.bias[seg]
        state["b_down_ED"] = src.down_proj.bias
    return state


@torch.no_grad()
def fill_experts_(layer: MoELayer, ffns: Sequence[DenseFFN], granularity: int) -> None:
    """Every expert of ``layer`` from :func:`segment_state`."""
    for i in range(layer.experts.num_experts):
        layer.experts.load_expert_state(i, segment_state(ffns, i, granularity))


def _new_config(mcfg: TransformerConfig, chosen: list[tuple[int, str, DenseFFN]], moe: MoEConfig,
                attn: MoAAttentionConfig | None = None) -> TransformerConfig:
    """The model config with MoE (and ``attn``, BAM's mixture of attention) at the chosen layers: model-wide
    when every layer is chosen and nothing else differs per layer, else one ``layer_overrides`` entry."""
    idx = [i for i, _, _ in chosen]
    same_width = all(f.d_ff == mcfg.d_ff for _, _, f in chosen)
    if mcfg.moe is None and not mcfg.layer_overrides and idx == list(range(mcfg.num_layers)) and same_width:
        return dataclasses.replace(mcfg, moe=moe, attention=attn or mcfg.attention)
    if not same_width:
        raise ConversionError(f"layers {idx}: dense FFN widths differ per layer; upcycle those layers separately "
                              "(layers: [...])")
    ov = LayerOverride(layers=idx, moe=moe, attention=attn)
    return dataclasses.replace(mcfg, layer_overrides=[*mcfg.layer_overrides, ov])


def _moa_config(mcfg: Any, cfg: UpcycleConfig, n: int, idx: list[int]) -> MoAAttentionConfig:
    """BAM: the ``moa`` config of the chosen layers, whose attention configs must agree."""
    if not isinstance(mcfg, TransformerConfig):
        raise ConversionError(f"{type(mcfg).__name__}: attention: moa needs a Transformer body (decoder_lm, "
                              "encoder_classifier, Hugging Face Llama / Mistral / Qwen2); this model's attention "
                              "cannot be upcycled")
    specs = [mcfg.layer_spec(i)[0] for i in idx]
    if any(s != specs[0] for s in specs):
        raise ConversionError(f"layers {idx}: attention settings differ per layer; upcycle those layers separately "
                              "(layers: [...])")
    return moa_config(specs[0], cfg, n, idx)


@converter("upcycle", UpcycleConfig, inputs=(1, None))
def upcycle_(model: nn.Module, cfg: UpcycleConfig, filter_fn: FilterFn | None = None, *,
             extra: Sequence[nn.Module] = ()) -> nn.Module:
    """Sparse upcycling (Komatsuzaki et al. 2023): every dense FFN becomes an MoE layer of its copies.

    Also drop-upcycling, fine-grained segments, and multiplet / BAM experts from several inputs (module
    docstring). Returns ``model``, changed in place (its ``cfg`` describes the new layers)."""
    sources = [model, *extra]
    if cfg.num_experts % len(sources):
        raise ConversionError(f"upcycle.num_experts = {cfg.num_experts}: expert count not divisible by the number "
                              f"of inputs ({len(sources)}); every input must give the same number of experts")
    body, chosen = dense_ffns(model, filter_fn, cfg.layers)
    _check_same(model, extra)
    others = [dense_ffns(o, filter_fn, cfg.layers)[1] for o in extra]
    mcfg: Any = body.cfg
    for _, path, ffn in chosen:
        if ffn.bias and ffn.gated:
            raise ConversionError(f"{path}: a gated FFN with biases has no experts kind (mlp_bias experts are plain)")
        if ffn.d_ff % cfg.granularity:
            raise ConversionError(f"{path}: granularity {cfg.granularity} does not divide d_ff ({ffn.d_ff})")
    moe = _moe_config(cfg, chosen[0][2])
    idx = [i for i, _, _ in chosen]
    bodies = [body, *(dense_ffns(o, None, None)[0] for o in extra)]
    moa = _moa_config(mcfg, cfg, len(sources), idx) if cfg.attention == "moa" else None
    if moa is not None:
        check_attention(bodies, idx)
    # A Transformer config says which layers are MoE; other bodies (BERT) keep their config and the converted
    # layers are saved as module_swaps (moesaic.transforms.convert_structure).
    new_cfg = (validate_tree(_new_config(mcfg, chosen, moe, moa), "model") if isinstance(mcfg, TransformerConfig)
               else mcfg)
    router_inputs = router_from_data_(model, cfg, [p for _, p, _ in chosen]) if cfg.router_init == "data" else {}
    # One generator, layer by layer: the drop-upcycling re-draws, then the random router rows. A streamed
    # layer keeps the generator state and re-draws when written; here it is advanced alike (on zeros).
    gen = torch.Generator().manual_seed(cfg.seed)
    n_drop = round(cfg.drop_fraction * moe.expert_d_ff)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for c, (i, path, ffn) in enumerate(chosen):
            ref = ffn.down_proj.weight
            srcs = [ffn, *(o[c][2] for o in others)]
            causal = getattr(body, "causal", False)
            if cfg.stream:
                streamed = [Source(f, p, lazy_state(m)) for f, p, m in
                            [(ffn, path, model), *((o[c][2], o[c][1], x) for o, x in zip(others, extra))]]
                drop = Drop(n_drop, gen.get_state()) if cfg.drop_fraction > 0 else None
                layer = streamed_layer(model, moe, streamed, cfg.granularity, causal, segment_state, drop)
                if drop is not None:
                    replay_drop_(layer, n_drop, gen)
            else:
                layer = moe.build(ffn.d_model, causal=causal).to(device=ref.device, dtype=ref.dtype)
                fill_experts_(layer, srcs, cfg.granularity)
                if cfg.drop_fraction > 0:
                    drop_reinit_(layer.experts, cfg.drop_fraction, gen)
            if cfg.router_init == "zero":
                nn.init.zeros_(layer.router.weight)
            elif cfg.router_init == "data":
                layer.router.weight.data.copy_(router_inputs[path].to(ref.dtype))
            else:
                layer.router.weight.data.copy_(torch.randn(layer.router.weight.shape, generator=gen) * cfg.router_std)
            body.layers[i].mlp = layer
        attn_layers = {i: build_moa_layer(moa, [b.layers[i].self_attn for b in bodies], mcfg.d_model, i,
                                          causal=bool(getattr(body, "causal", False)), norm_eps=mcfg.rms_norm_eps,
                                          router_init=cfg.attention_router_init or cfg.router_init,
                                          average_kv=cfg.non_expert == "average")
                       for i in idx} if moa is not None else {}
    if cfg.non_expert == "average" and extra:
        _average_non_expert_(model, extra)
    for i, attn in attn_layers.items():  # after averaging: the experts are the seeds' own attentions
        body.layers[i].self_attn = attn
    body.cfg = new_cfg
    if getattr(model, "cfg", None) is mcfg:
        model.cfg = new_cfg
    name_layers(model)
    return model


def expert_counts(model: nn.Module) -> dict[str, int]:
    """Active and total parameters of a model (MoE layers count ``top_k`` of their experts as active)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoELayer):
            per = sum(p.numel() for p in m.experts.parameters()) // m.num_experts
            inactive += per * (m.num_experts - m.top_k)
    return {"total": total, "active": total - inactive}



def upcycle_state(dense: dict[str, torch.Tensor], target: dict[str, torch.Tensor], scale: float = 1.0
                  ) -> dict[str, torch.Tensor]:
    """A state for a model with ``target``'s names and shapes from the state of its dense twin: every MoE FFN
    ``P.experts.*`` gets a copy of the dense FFN ``P.{gate,up,down}_proj`` in each expert (copy upcycling,
    Komatsuzaki et al. 2023; biases too, for ``mlp_bias`` experts); names the dense state already has are
    taken as they are; names it cannot give (routers) keep ``target``'s values. ``scale`` multiplies the expert
    outputs (down projection and its bias): E for a zero-initialised top-1 router of E experts (weight 1/E)
    keeps the dense function at step 0, as fine-grained upcycling scales its segments. ``moesaic train`` starts
    ``model.pretrained`` models this way (docs/zoo.md, "Embeddings")."""
    out: dict[str, torch.Tensor] = {}
    for name, t in target.items():
        prefix, _, leaf = name.rpartition(".experts.")
        E = t.shape[0] if t.dim() else 0
        if name in dense:
            out[name] = dense[name]
        elif leaf == "w_up_EHD" and f"{prefix}.up_proj.weight" in dense:
            gate = dense.get(f"{prefix}.gate_proj.weight")
            w = dense[f"{prefix}.up_proj.weight"]
            out[name] = (torch.cat([gate, w]) if gate is not None else w).expand(E, *t.shape[1:]).clone()
        elif leaf == "w_down_EDF" and f"{prefix}.down_proj.weight" in dense:
            out[name] = dense[f"{prefix}.down_proj.weight"].expand(E, *t.shape[1:]) * scale
        elif leaf == "b_up_EF" and f"{prefix}.up_proj.bias" in dense:
            out[name] = dense[f"{prefix}.up_proj.bias"].expand(E, *t.shape[1:]).clone()
        elif leaf == "b_down_ED" and f"{prefix}.down_proj.bias" in dense:
            out[name] = dense[f"{prefix}.down_proj.bias"].expand(E, *t.shape[1:]) * scale
        else:
            out[name] = t
    missing = [n for n in dense if n not in out and not any(n.startswith(f"{p}.") for p in _moe_prefixes(target))]
    if missing:
        raise ConversionError(f"upcycle: the dense state has tensors the target model lacks: {missing[:4]}")
    return out


def _moe_prefixes(target: dict[str, torch.Tensor]) -> set[str]:
    return {n.rpartition(".experts.")[0] for n in target if ".experts." in n}


def pretrained_init_state(model_cfg: Any, seed: int) -> dict[str, torch.Tensor] | None:
    """The start state of a model config with ``pretrained`` set (None without): the dense checkpoint it names
    (:func:`moesaic.train.pretrained.resolve_pretrained`, opened by :func:`moesaic.interop.load.load_any`)
    upcycled by :func:`upcycle_state` into the config's model, built as the trainer builds it (seeded ``seed``)
    so that parameters the checkpoint lacks (routers) start as they would without it."""
    spec = getattr(model_cfg, "pretrained", "")
    if not spec:
        return None
    from moesaic.distributed.expert_state import local_model_state
    from moesaic.interop.load import load_any
    from moesaic.train.pretrained import resolve_pretrained

    dense = local_model_state(load_any(resolve_pretrained(spec, "model.pretrained")))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        target = model_cfg.build()
    return upcycle_state(dense, local_model_state(target), float(getattr(model_cfg, "upcycle_scale", 1.0)))
