"""Attention experts as attention kinds: selective multi-head attention (``uoe``) and the mixture of attention
heads (``moa``, shared or per-expert keys/values): cached decoding equals the full forward, heads/experts are
routed per token, router aux losses are collected, typed errors."""

import pytest
import torch

import moesaic
from moesaic.core.config import parse, validate_tree
from moesaic.core.errors import ConfigError
from moesaic.models.base import MODELS
from moesaic.models.cache import KVCache

ATTN = [
    {"kind": "uoe", "num_heads": 4, "top_k": 2, "router": {"kind": "topk", "aux_loss_coef": 0.01}},
    {"kind": "uoe", "num_heads": 4, "num_key_value_heads": 2, "top_k": 1},
    {"kind": "moa", "num_heads": 2, "num_experts": 4, "top_k": 2, "shared_kv": True,
     "router": {"kind": "topk", "aux_loss_coef": 0.01}},
    {"kind": "moa", "num_heads": 2, "num_experts": 3, "top_k": 1, "shared_kv": False},
]


def lm(attn):
    data = {"kind": "decoder_lm", "vocab_size": 40, "d_model": 16, "num_layers": 2, "d_ff": 32, "max_seq_len": 32,
            "attention": attn}
    cfg = validate_tree(parse(MODELS.config_of("decoder_lm"), data, "model"), "model")
    torch.manual_seed(0)
    return cfg.build().double().eval()


@pytest.mark.parametrize("attn", ATTN, ids=lambda a: f"{a['kind']}-{a.get('top_k')}-{a.get('shared_kv', '')}")
def test_cached_decode_equals_full_forward(attn):
    model = lm(attn)
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits
    cache = KVCache()
    steps = [model(ids[:, :6], cache=cache).logits]
    for t in range(6, 10):
        steps.append(model(ids[:, t:t + 1], cache=cache).logits)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-10
    if "aux_loss_coef" in str(attn.get("router", {})):
        model(ids)
        assert moesaic.collect_aux_losses(model, by_name=True)["balance"].item() > 0


def test_uoe_uses_only_the_selected_heads():
    model = lm(ATTN[0])
    attn = model.model.layers[0].self_attn if hasattr(model, "model") else next(
        m for m in model.modules() if type(m).__name__ == "SelectiveMultiHeadAttention")
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    pos = torch.arange(5)[None]
    g = attn.head_gates(x)
    assert ((g > 0).sum(-1) == 2).all()
    with torch.no_grad():  # zeroing an unselected head's o_proj columns changes nothing for the token
        out = attn(x, pos)
        h = int((g[0, -1] == 0).nonzero()[0])
        attn.o_proj.weight[:, h * 4:(h + 1) * 4] = 0
        assert torch.allclose(attn(x, pos)[0, -1], out[0, -1], atol=1e-12)


def test_moa_shared_kv_has_one_key_projection():
    shared, own = lm(ATTN[2]), lm(ATTN[3])
    names = [n for n, _ in shared.named_parameters() if "k_proj" in n]
    assert names and all(".experts." not in n for n in names)
    assert all(".experts." in n for n, _ in own.named_parameters() if "k_proj" in n)


@pytest.mark.parametrize("attn,field", [({"kind": "uoe", "num_heads": 2, "top_k": 3}, "model.attention.top_k"),
                                        ({"kind": "moa", "num_heads": 2, "num_experts": 2, "top_k": 3},
                                         "model.attention.top_k")])
def test_typed_errors(attn, field):
    with pytest.raises(ConfigError, match=field):
        lm(attn)
