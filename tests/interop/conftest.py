"""Tiny random Hugging Face models of every supported architecture, built from configs (no downloads).

Every parameter is re-drawn (norm weights around 1, biases and DeepSeek's ``e_score_correction_bias``
non-zero) so that a swapped, transposed or skipped tensor changes the logits.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def hf_config(name: str):
    T = transformers
    if name == "mixtral":  # sliding window shorter than the generated sequence
        return T.MixtralConfig(**COMMON, num_hidden_layers=2, intermediate_size=24, num_local_experts=4,
                               num_experts_per_tok=2, sliding_window=6)
    if name == "qwen2_moe":  # decoder_sparse_step 2 and mlp_only_layers: layers 0, 1, 2 dense, 3 MoE
        return T.Qwen2MoeConfig(**COMMON, num_hidden_layers=4, intermediate_size=32, moe_intermediate_size=12,
                                shared_expert_intermediate_size=20, num_experts=4, num_experts_per_tok=2,
                                decoder_sparse_step=2, mlp_only_layers=[1], norm_topk_prob=False)
    if name == "qwen3_moe":  # head_dim != hidden/heads, biases on q/k/v/o, expert width == hidden (square)
        return T.Qwen3MoeConfig(**COMMON, num_hidden_layers=3, intermediate_size=32, moe_intermediate_size=16,
                                num_experts=4, num_experts_per_tok=2, head_dim=8, attention_bias=True,
                                norm_topk_prob=True, mlp_only_layers=[0])
    if name == "olmoe":  # expert width == 2 * hidden (square gate_up)
        return T.OlmoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=32, num_experts=4,
                             num_experts_per_tok=2, norm_topk_prob=False)
    if name in ("deepseek_v3", "deepseek_v3_plain"):
        plain = name.endswith("plain")  # no q LoRA, rotate-half RoPE, no group limit, no renormalisation
        c = dict(COMMON, num_key_value_heads=4)
        return T.DeepseekV3Config(**c, num_hidden_layers=3, intermediate_size=32, moe_intermediate_size=8,
                                  n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
                                  n_group=1 if plain else 4, topk_group=1 if plain else 2, first_k_dense_replace=1,
                                  q_lora_rank=None if plain else 12, kv_lora_rank=8, qk_rope_head_dim=4,
                                  qk_nope_head_dim=6, v_head_dim=6, routed_scaling_factor=2.5,
                                  norm_topk_prob=not plain, rope_interleave=not plain)
    if name == "llama":  # attention biases, tied embeddings
        return T.LlamaConfig(**COMMON, num_hidden_layers=2, intermediate_size=32, attention_bias=True,
                             tie_word_embeddings=True)
    if name == "mistral":
        return T.MistralConfig(**COMMON, num_hidden_layers=2, intermediate_size=32, sliding_window=5)
    if name == "qwen2":
        return T.Qwen2Config(**COMMON, num_hidden_layers=2, intermediate_size=32)
    if name == "llama_rope_llama3":
        rp = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
        return T.LlamaConfig(**COMMON, num_hidden_layers=2, intermediate_size=32, rope_parameters=rp)
    if name == "mistral_rope_linear":
        return T.MistralConfig(**COMMON, num_hidden_layers=2, intermediate_size=32, sliding_window=None,
                               rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 3.0})
    if name == "deepseek_v3_yarn":
        rp = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 1.0}
        c = hf_config("deepseek_v3")
        c.rope_parameters = rp
        return c
    raise KeyError(name)


ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v3_plain", "llama", "mistral",
         "qwen2"]
#: RoPE scaling variants (linear, Llama 3, YaRN with DeepSeek's mscale).
ROPE = ["llama_rope_llama3", "mistral_rope_linear", "deepseek_v3_yarn"]


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "inv_freq" in name or not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if name.endswith("norm.weight"):
            t.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            t.copy_(0.1 * noise)
        else:
            t.copy_(0.25 * noise)


def build_hf(name: str, folder, seed: int = 0, **save_kw):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(name), attn_implementation="eager")
    randomize(model, seed)
    model.eval()
    model.save_pretrained(str(folder), **save_kw)
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (folder, transformers model), built once per test module."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = (folder, build_hf(name, folder))
        return cache[name]

    return get


def padded_batch(vocab: int = 96, seed: int = 1):
    """Two prompts of 9 tokens; the first left-padded by 3 (attention_mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    ids[0, :3] = 0
    return ids, mask
