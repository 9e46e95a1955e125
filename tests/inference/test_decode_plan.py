"""The decode plan (``moesaic.inference.decode_plan``): a batch-1 decode step that runs the modules' ops without
their calls must give the module path's logits bit for bit, keep every contract (hooks, routing hooks, LoRA,
quantized and offloaded experts, statistics, typed errors) by stepping aside, and follow a model changed
mid-session."""

from __future__ import annotations

import contextlib

import pytest
import torch

from decode_fixtures import tiny_lm
from moesaic.core.config import parse, validate_tree
from moesaic.core.errors import NonFiniteInputError
from moesaic.inference import DecodeSession, SamplingParams
from moesaic.inference.decode_plan import DecodePlan
from moesaic.models.decoder import DecoderLM, DecoderLMConfig
from moesaic.moe.layer import MoELayer

PROMPT = [5, 9, 2, 7, 1, 3]


def decode(model, n=10, plan=True, prompt=PROMPT, each_step=None, max_batch=1):
    """Logits ``[n, V]`` of greedy decoding ``prompt`` and the number of steps the plan ran; ``each_step(i)`` runs
    before decode step i (i = 1..n-1, after the prefill's token)."""
    sess = DecodeSession(model, max_batch, keep_logits=True)
    if not plan:
        sess.plan = None
    sess.add(prompt, SamplingParams(max_new_tokens=n))
    out = []
    with counted_plan_steps() as ran:
        while sess.live or sess._pending:
            if each_step is not None and out:
                each_step(len(out))
            out += [e.logits for e in sess.step()]
    return torch.stack(out), len(ran)


@contextlib.contextmanager
def counted_plan_steps():
    """The real :meth:`DecodePlan.step`, counted."""
    ran: list[int] = []
    real = DecodePlan.step

    def step(self, *a):
        ran.append(1)
        return real(self, *a)

    DecodePlan.step = step
    try:
        yield ran
    finally:
        DecodePlan.step = real


def lm(**over) -> DecoderLM:
    torch.manual_seed(0)
    data = {"vocab_size": 32, "d_model": 16, "num_layers": 2, "d_ff": 32, "max_seq_len": 48,
            "attention": {"num_heads": 2}, "moe": {"d_ff": 32, "num_experts": 4, "top_k": 2}}
    for k, v in over.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return DecoderLM(validate_tree(parse(DecoderLMConfig, data, "model"), "model")).eval()


CONFIGS = {
    "plain": {},
    "gqa_bias_tied_shared_dense_sigmoid": {
        "attention": {"num_heads": 4, "num_key_value_heads": 2, "bias": True, "o_bias": True},
        "tie_word_embeddings": True, "first_k_dense": 1, "num_layers": 3,
        "moe": {"shared_experts": {"num": 1}, "router": {"kind": "topk", "score_func": "sigmoid", "n_groups": 2,
                                                         "topk_groups": 1, "expert_bias": True,
                                                         "routed_scaling_factor": 2.0}}},
    "qk_norm_window_mlp_experts": {"attention": {"num_heads": 2, "qk_norm": True, "sliding_window": 3},
                                   "moe": {"experts": {"kind": "mlp"}, "router": {"kind": "topk",
                                                                                  "normalization": "none"}}},
    "other_router_and_rope_scaling": {
        "attention": {"num_heads": 2, "rope_scaling": {"type": "yarn", "factor": 2.0,
                                                       "original_max_position_embeddings": 16}},
        "moe": {"router": {"kind": "switch"}, "top_k": 1}},
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_plan_logits_equal_the_module_path_bitwise(name, dtype):
    m = lm(**CONFIGS[name]).to(dtype)
    fast, ran = decode(m)
    slow, _ = decode(m, plan=False)
    assert ran == 9 and torch.equal(fast, slow)
    again, _ = decode(m)  # the rotary angles of these positions now come from the plan's memo
    assert torch.equal(again, slow)


def test_plan_equals_module_path_on_a_transformers_import():
    from transformers import MixtralConfig, MixtralForCausalLM

    from moesaic.interop.hf import from_hf

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
                        router_jitter_noise=0.0)
    m = from_hf(MixtralForCausalLM(cfg).eval()).eval()
    fast, ran = decode(m, 12)
    assert ran == 11 and torch.equal(fast, decode(m, 12, plan=False)[0])
    stats = [layer.last_stats for layer in m.modules() if isinstance(layer, MoELayer)]
    decode(m, 12, plan=False)
    for layer, s in zip((x for x in m.modules() if isinstance(x, MoELayer)), stats, strict=True):
        ref = layer.last_stats
        assert torch.equal(s["tokens_per_expert"], ref["tokens_per_expert"])
        assert torch.equal(s["entropy"], ref["entropy"])


def test_hooks_are_called_and_step_aside():
    m = tiny_lm()
    slow, _ = decode(m, plan=False)
    calls: list[str] = []
    h1 = m.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append("q_proj"))
    h2 = m.model.layers[1].mlp.register_routing_hook(lambda *a: calls.append("routing"))
    h3 = m.model.layers[1].post_attention_layernorm.register_forward_pre_hook(lambda *a: calls.append("norm"))
    fast, ran = decode(m)
    assert ran == 9 and torch.equal(fast, slow)  # the blocks with hooks call their modules
    assert calls.count("q_proj") == calls.count("routing") == calls.count("norm") == 10  # prefill + 9 steps
    for h in (h1, h2, h3):
        h.remove()
    h = m.model.register_forward_hook(lambda *a: calls.append("body"))  # the body itself: no plan step at all
    fast, ran = decode(m)
    assert ran == 0 and torch.equal(fast, slow) and calls.count("body") == 10
    h.remove()
    h = torch.nn.modules.module.register_module_forward_hook(lambda *a: calls.append("global"))
    try:
        fast, ran = decode(m)
    finally:
        h.remove()
    assert ran == 0 and torch.equal(fast, slow) and "global" in calls


def test_lora_quantized_and_offloaded_experts_match_their_module_path(tmp_path):
    from moesaic.inference.offload import OffloadConfig, memory_store, offload_experts_
    from moesaic.inference.quant import QuantConfig, quantize_experts_
    from moesaic.peft.config import LoRAExpertsConfig
    from moesaic.peft.inject import inject_lora_experts_

    m = tiny_lm()
    inject_lora_experts_(m, LoRAExpertsConfig(num_experts=2, top_k=1), target_modules=["q_proj", "experts.w_up_EHD"])
    for p in m.parameters():  # non-zero adapters, so they change the logits
        p.data.add_(0.01 * torch.randn_like(p))
    fast, ran = decode(m)
    assert ran == 9 and torch.equal(fast, decode(m, plan=False)[0])
    q = tiny_lm()
    quantize_experts_(q, QuantConfig(group_size=8))
    fast, ran = decode(q)
    assert ran == 9 and torch.equal(fast, decode(q, plan=False)[0])
    o = tiny_lm()
    offload_experts_(o, memory_store(o), OffloadConfig(cache_experts=2))
    fast, ran = decode(o)
    assert ran == 9 and torch.equal(fast, decode(o, plan=False)[0]) and torch.equal(fast, decode(tiny_lm())[0])


def test_a_model_changed_mid_session_is_followed():
    def change(model):
        def at(i):
            layer = model.model.layers[1]
            if i == 3:  # a module replaced: the plan is made again
                o = torch.nn.Linear(16, 16, bias=False)
                o.weight.data.copy_(layer.self_attn.o_proj.weight * 1.5)
                layer.self_attn.o_proj = o
            if i == 5:  # new storage for the stacked experts: their per-expert views are made again
                w = layer.mlp.experts.w_up_EHD
                w.data = w.data.flip(0).contiguous()
            if i == 7:  # a routing hook: that layer's MoE runs its general path
                layer.mlp.register_routing_hook(lambda *a: None)
        return at

    a, b = tiny_lm(), tiny_lm()
    fast, ran = decode(a, each_step=change(a))
    slow, _ = decode(b, plan=False, each_step=change(b))
    assert ran == 9 and torch.equal(fast, slow)


def test_nonfinite_input_is_the_same_typed_error():
    m = tiny_lm()
    sess = DecodeSession(m, 1)
    sess.add(PROMPT, SamplingParams(max_new_tokens=4))
    sess.step()
    assert sess.plan is not None
    m.model.embed_tokens.weight.data[:] = float("nan")
    with pytest.raises(NonFiniteInputError, match="layers.0.mlp"):
        sess.step()


def test_no_plan_for_other_models_and_batches():
    m = tiny_lm()
    wide = decode(m, max_batch=3)  # one live row of three: its steps are batch 1
    assert wide[1] == 9 and torch.equal(wide[0], decode(m, plan=False)[0])
    sess = DecodeSession(m, 2, keep_logits=True)
    sess.add_batch([PROMPT, PROMPT[:3]], [SamplingParams(max_new_tokens=4)] * 2)  # two rows: the module path
    with counted_plan_steps() as ran:
        sess.run()
    assert sess.plan is not None and ran == []
    assert DecodeSession(m, 1, compile=True).plan is None
    assert DecodeSession(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1, step_fn=lambda *a: a[0]).plan is None
