"""Saving adapters: LoRA experts as ``lora_experts.safetensors`` + ``lora_experts.json`` (read back by
:func:`load_lora_experts_`), and plain LoRA as a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` opens on the transformers model.

Folders are written atomically: into a temporary sibling, then renamed; an existing folder is refused unless
it holds only files this module writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moesaic.core.config import ConfigError, parse, to_dict
from moesaic.core.errors import CheckpointError
from moesaic.peft.config import LoRAExpertsConfig
from moesaic.peft.inject import inject_lora_experts_, lora_modules
from moesaic.peft.lora_linear import LoRAExpertsLinear

EXPERTS_FILES = ("lora_experts.safetensors", "lora_experts.json")
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor (adapters, routers, modules_to_save) by its name in ``model``."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _write_folder(out: str | Path, files: dict[str, Any], ours: tuple[str, ...]) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(p.name not in ours for p in out.iterdir())):
        raise CheckpointError(f"{out}: exists and holds files this command did not write; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, content in files.items():
            if isinstance(content, dict) and name.endswith(".safetensors"):
                save_file(content, str(tmp / name), metadata={"format": "pt"})
            else:
                (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_lora_experts(model: nn.Module, out: str | Path) -> Path:
    """Write the adapters of an injected model (any E) and the config that built them."""
    cfg = getattr(model, "peft_config", None)
    if not isinstance(cfg, LoRAExpertsConfig):
        raise ConfigError("model", type(model).__name__, "has no LoRA experts (call inject_lora_experts_ first)")
    layout = {n: {"num_experts": m.num_experts, "top_k": m.top_k} for n, m in lora_modules(model).items()}
    return _write_folder(out, {"lora_experts.safetensors": adapter_state(model),
                               "lora_experts.json": {"config": to_dict(cfg), "layers": layout}}, EXPERTS_FILES)


def load_lora_experts_(model: nn.Module, path: str | Path) -> nn.Module:
    """Inject the saved config into ``model`` (a fresh base model) and load the saved adapter weights."""
    path = Path(path)
    if not (path / "lora_experts.json").is_file():
        raise CheckpointError(f"{path}: no lora_experts.json (a folder written by save_lora_experts)")
    meta = json.loads((path / "lora_experts.json").read_text())
    cfg = parse(LoRAExpertsConfig, meta["config"], "peft")
    inject_lora_experts_(model, cfg)
    state = load_file(str(path / "lora_experts.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(adapter_state(model)) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise CheckpointError(f"{path}: adapter weights do not fit the model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    with torch.no_grad():
        for n, t in state.items():
            if params[n].shape != t.shape:
                raise CheckpointError(f"{path}: {n} has shape {tuple(t.shape)}, the model {tuple(params[n].shape)}")
            params[n].copy_(t)
    return model


def save_peft_adapter(model: nn.Module, out: str | Path, hf_names: bool | dict[str, str] = False) -> Path:
    """Write plain LoRA (every adapter E = 1, no shared LoRA, nn.Linear targets) as a PEFT LoRA adapter folder.

    ``hf_names=True``: the model is a moesaic model of a transformers architecture (``moesaic.load`` of an HF
    folder, or exportable by ``to_hf``), and module names are written as transformers names
    (:func:`moesaic.peft.hf_names.hf_module_names`), so ``peft.PeftModel.from_pretrained`` opens the adapter on
    the transformers model; a dict gives the names directly. Keys follow PEFT:
    ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``lora_B.weight``
    ``[out, r]``; ``lora_alpha / r`` is the same scaling. Anything else raises ConfigError naming the field."""
    cfg = getattr(model, "peft_config", None)
    if not isinstance(cfg, LoRAExpertsConfig):
        raise ConfigError("model", type(model).__name__, "has no LoRA adapters (call inject_lora_experts_ first)")
    tensors: dict[str, torch.Tensor] = {}
    if hf_names is True:
        from moesaic.peft.hf_names import hf_module_names

        names: dict[str, str] | None = hf_module_names(model)
    else:
        names = hf_names or None
    targets: set[str] = set()
    for name, m in lora_modules(model).items():
        if not isinstance(m, LoRAExpertsLinear):
            raise ConfigError("peft.target_modules", name, "PEFT adapters hold nn.Linear LoRA only, not stacked "
                                                           "expert weights; use save_lora_experts")
        if m.num_experts != 1 or m.shared:
            raise ConfigError("peft.num_experts", m.num_experts,
                              f"{name}: a PEFT adapter is plain LoRA (num_experts: 1, shared: false); "
                              "use save_lora_experts")
        if names is not None and name not in names:
            raise ConfigError("peft.target_modules", name, "has no transformers name in this model's layout")
        hf = names[name] if names is not None else name
        targets.add(hf)  # full names: PEFT then adapts exactly these modules
        tensors[f"base_model.model.{hf}.lora_A.weight"] = m.lora_A_ERI[0].detach().contiguous()
        tensors[f"base_model.model.{hf}.lora_B.weight"] = m.lora_B_EOR[0].detach().contiguous()
    for n, p in model.named_parameters():  # modules_to_save: PEFT keeps them as <module>.modules_to_save...
        if p.requires_grad and ".lora_" not in n:
            raise ConfigError("peft.modules_to_save", cfg.modules_to_save,
                              "a PEFT adapter written by moesaic holds LoRA weights only")
    config = {"peft_type": "LORA", "task_type": None, "r": cfg.rank, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": sorted(targets), "bias": "none",
              "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
              "inference_mode": True, "use_rslora": False, "use_dora": False, "base_model_name_or_path": None}
    return _write_folder(out, {"adapter_model.safetensors": tensors, "adapter_config.json": config}, PEFT_FILES)
