"""A tiny Shakespeare genre-classification run (char tokens, few windows, a 2-layer MoE encoder) for the
classification dataset, trainer and CLI tests."""

import copy

TINY_GENRE = {
    "model": {"kind": "encoder_classifier", "num_labels": 3, "d_model": 16, "num_layers": 2, "d_ff": 32,
              "max_seq_len": 16, "attention": {"num_heads": 2},
              "moe": {"d_ff": 16, "num_experts": 4, "top_k": 2,
                      "router": {"kind": "expert_choice", "capacity_factor": 2.0, "z_loss_coef": 0.001}}},
    "data": {"kind": "shakespeare_genre", "tokenizer": "char", "seq_len": 16, "val_per_class": 1,
             "windows_per_play": 8, "eval_windows_per_play": 4},
    "train": {"max_steps": 6, "batch_size": 4, "grad_accum": 1, "lr": 0.003, "warmup_steps": 2, "log_every": 1,
              "eval_every": 3, "save_every": 3, "keep_last": 3, "tensorboard": False, "progress": False,
              "threads": 1},
}


def tiny_genre(**sections) -> dict:
    """A deep copy of :data:`TINY_GENRE` with ``sections`` (e.g. ``train={...}``) merged into it."""
    d = copy.deepcopy(TINY_GENRE)
    for k, v in sections.items():
        d[k].update(v)
    return d
