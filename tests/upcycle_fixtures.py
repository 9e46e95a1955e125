"""A tiny Hugging Face Llama folder with non-trivial weights (biases, GQA, tied embeddings) for the upcycling
CLI tests."""

import torch
import transformers


def hf_llama(folder, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, intermediate_size=32, max_position_embeddings=64,
                                   attention_bias=True, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    model.eval()
    model.save_pretrained(str(folder))
    return model
