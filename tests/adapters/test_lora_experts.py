"""LoRA experts (moesaic.peft): exact at init on moesaic and transformers models, only adapters train,
the fast path equals the per-expert reference, routers' aux losses are collected, typed errors, allocations,
merge/unmerge."""

import copy

import pytest
import torch
import transformers

import moesaic
from moesaic.core.config import parse, validate_tree
from moesaic.core.errors import ConfigError
from moesaic.models.base import MODELS
from moesaic.moe.routing.base import RouterConfig
from moesaic.peft import (
    LoRAExpertsConfig,
    LoRAExpertsLinear,
    PeftMergeError,
    inject_lora_experts_,
    lora_modules,
    merge_,
    trainable_parameters,
    unmerge_,
)
from moesaic.peft.allocation import allocate

TINY_LM = {"kind": "decoder_lm", "vocab_size": 50, "d_model": 16, "num_layers": 4, "d_ff": 32, "max_seq_len": 32,
           "attention": {"num_heads": 2},
           "moe": {"d_ff": 16, "num_experts": 4, "top_k": 2, "router": {"kind": "topk", "aux_loss_coef": 0.01}}}


def moesaic_lm(seed=0):
    torch.manual_seed(seed)
    return parse(MODELS.config_of("decoder_lm"), TINY_LM, "model").build().eval()


def hf_model(arch):
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common)).eval()
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **common)).eval()
    if arch == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(num_key_value_heads=2, num_local_experts=4,
                                                                          num_experts_per_tok=2, **common)).eval()
    return transformers.BertModel(transformers.BertConfig(**common)).eval()


def logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


IDS = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("experts", [1, 4])
def test_moesaic_lm_equals_base_at_init(experts):
    model = moesaic_lm()
    want = logits(model, IDS)
    cfg = LoRAExpertsConfig(target_modules=["q_proj", "v_proj", "o_proj", "w_up_EHD", "w_down_EDF"],
                            num_experts=experts, top_k=min(2, experts), shared=True)
    inject_lora_experts_(model, cfg)
    assert torch.equal(logits(model, IDS), want)
    kinds = {type(m).__name__ for m in lora_modules(model).values()}
    assert kinds == {"LoRAExpertsLinear", "StackedLoRA"}


@pytest.mark.parametrize("arch,targets", [
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
    ("qwen2", ["q_proj", "v_proj"]),
    ("mixtral", ["q_proj", "v_proj", "gate_up_proj", "experts.down_proj"]),  # fused 3-D expert parameters
    ("bert", ["query", "value", "dense"]),
])
def test_hf_models_equal_base_at_init(arch, targets):
    model = hf_model(arch)
    ids = IDS % 64
    want = logits(model, ids)
    inject_lora_experts_(model, LoRAExpertsConfig(num_experts=4, top_k=2), target_modules=targets)
    assert torch.equal(logits(model, ids), want)
    if arch == "mixtral":
        assert any(type(m).__name__ == "StackedLoRA" for m in lora_modules(model).values())


def test_only_adapters_train_and_base_is_bitwise_unchanged():
    model = moesaic_lm()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject_lora_experts_(model, LoRAExpertsConfig(num_experts=4, top_k=1, shared=True,
                                                  target_modules=["q_proj", "v_proj", "w_up_EHD"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        out = model(IDS).logits
        loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 50), IDS[:, 1:].reshape(-1))
        (loss + moesaic.collect_aux_losses(model)).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert any(k in n for k in ("lora_", "shared_", ".router.")), n
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    for n, p in base.items():  # q_proj.weight -> q_proj.base.weight; w_up_EHD -> parametrizations...original
        n2 = n.replace("q_proj.", "q_proj.base.").replace("v_proj.", "v_proj.base.")
        n2 = n2.replace("experts.w_up_EHD", "experts.parametrizations.w_up_EHD.original")
        assert torch.equal(after[n2], p), n
    assert any(m.lora_B_EOR.abs().sum() > 0 for m in lora_modules(model).values())


def test_fast_path_equals_per_expert_reference_float64():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 10).double()
    m = LoRAExpertsLinear(lin, 3, 6.0, 0.0, 5, 2, RouterConfig.for_kind("topk"), shared=True).double()
    torch.nn.init.normal_(m.lora_B_EOR)
    torch.nn.init.normal_(m.shared_B_OR)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    assert torch.allclose(m(x), m.forward_reference(x), atol=1e-12)
    g = m.last_weights_TE
    assert g is not None and ((g > 0).sum(1) == 2).all()  # top-2 per token


def test_router_aux_losses_reach_collect_aux_losses():
    model = hf_model("llama")
    router = parse(RouterConfig, {"kind": "topk", "aux_loss_coef": 0.5, "z_loss_coef": 0.1}, "r")
    inject_lora_experts_(model, LoRAExpertsConfig(num_experts=4, top_k=2, router=router))
    model(IDS % 64)
    by_name = moesaic.collect_aux_losses(model, by_name=True)
    assert set(by_name) == {"balance", "z"} and by_name["balance"].item() > 0
    assert by_name["balance"].requires_grad


@pytest.mark.parametrize("kind", ["noisy_topk", "switch"])
def test_any_registered_router(kind):
    model = hf_model("qwen2")
    k = 1 if kind == "switch" else 2
    inject_lora_experts_(model, LoRAExpertsConfig(num_experts=4, top_k=k, router=RouterConfig.for_kind(kind)))
    model(IDS % 64)


def test_typed_errors_name_the_field():
    cases = [
        (dict(target_modules=["nope_proj"]), "peft.target_modules"),
        (dict(target_modules=["mlp"]), "peft.target_modules"),       # a non-linear module
        (dict(target_modules=["input_layernorm"]), "peft.target_modules"),
        (dict(rank=0), "peft.rank"),
        (dict(num_experts=2, top_k=3), "peft.top_k"),
        (dict(num_experts=[4, 4, 2, 4], top_k=3), "peft.top_k"),
        (dict(num_experts=[4, 4]), "peft.num_experts"),
    ]
    for overrides, field in cases:
        model = hf_model("llama")
        with pytest.raises(ConfigError) as err:
            inject_lora_experts_(model, LoRAExpertsConfig(**overrides))
        assert err.value.field == field if hasattr(err.value, "field") else field in str(err.value)
        assert field in str(err.value)


def test_mola_allocations_keep_the_total():
    for depth in (4, 6, 12, 32):
        for kind in ("uniform", "increasing", "decreasing", "hourglass"):
            counts = allocate(kind, 4, depth, floor=2)
            assert sum(counts) == 4 * depth and min(counts) >= 2
        inc, dec = allocate("increasing", 5, depth), allocate("decreasing", 5, depth)
        assert inc == sorted(inc) and dec == sorted(dec, reverse=True) and inc[-1] > inc[0]
    assert allocate("increasing", 5, 32)[::8] == [2, 4, 6, 8]  # MoLA's 2-4-6-8 on 32 layers
    model = hf_model("llama")
    inject_lora_experts_(model, LoRAExpertsConfig(num_experts=4, top_k=2, allocation="increasing",
                                                  target_modules=["q_proj"]))
    counts = [m.num_experts for m in lora_modules(model).values()]
    assert sum(counts) == 16 and counts == sorted(counts) and counts[0] < counts[-1]


def test_merge_is_exact_for_plain_lora_and_a_fixed_expert_and_refused_otherwise():
    model = hf_model("llama").double()
    inject_lora_experts_(model, LoRAExpertsConfig(num_experts=1, target_modules=["q_proj", "down_proj"]))
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B_EOR, std=0.1)
    ids = IDS % 64
    want = logits(model, ids)
    w0 = model.model.layers[0].self_attn.q_proj.base.weight.clone()
    merge_(model)
    assert (logits(model, ids) - want).abs().max() < 1e-10
    unmerge_(model)
    assert (model.model.layers[0].self_attn.q_proj.base.weight - w0).abs().max() < 1e-12
    routed = hf_model("llama").double()
    inject_lora_experts_(routed, LoRAExpertsConfig(num_experts=3, top_k=1, target_modules=["q_proj"]))
    for m in lora_modules(routed).values():
        torch.nn.init.normal_(m.lora_B_EOR, std=0.1)
    with pytest.raises(PeftMergeError, match="layers.0.self_attn.q_proj"):
        merge_(routed)
    for m in lora_modules(routed).values():
        m.fixed_expert = 2  # task routing: this task always uses expert 2
    want = logits(routed, ids)
    merge_(routed, expert=2)
    assert (logits(routed, ids) - want).abs().max() < 1e-10


def test_yaml_peft_section_builds_an_injected_model():
    data = copy.deepcopy(TINY_LM)
    data["peft"] = {"kind": "lora_experts", "target_modules": ["q_proj", "v_proj"], "num_experts": 4, "top_k": 1,
                    "allocation": "increasing", "router": {"kind": "topk", "aux_loss_coef": 0.01}}
    cfg = parse(MODELS.config_of("decoder_lm"), data, "model")
    torch.manual_seed(0)
    model = cfg.build()
    assert [m.num_experts for n, m in lora_modules(model).items() if n.endswith("q_proj")] == [2, 3, 5, 6]
    assert trainable_parameters(model) == sum(p.numel() for n, p in model.named_parameters()
                                              if "lora_" in n or ".router." in n and "self_attn" in n)
    torch.manual_seed(0)
    assert torch.equal(model.eval()(IDS).logits, moesaic_lm()(IDS).logits)
    with pytest.raises(ConfigError, match="model.peft.rank"):
        validate_tree(parse(MODELS.config_of("decoder_lm"), {**data, "peft": {"rank": 0}}, "model"), "model")
