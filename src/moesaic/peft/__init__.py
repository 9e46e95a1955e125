"""Parameter-efficient fine-tuning with experts: LoRA experts on any moesaic or transformers model
(docs/peft.md). Attention experts are attention kinds of the model registry (``uoe``, ``moa``)."""

from moesaic.peft.config import LoRAExperts, LoRAExpertsConfig
from moesaic.peft.inject import inject_lora_experts_, lora_modules, merge_, trainable_parameters, unmerge_
from moesaic.peft.io import load_lora_experts_, save_lora_experts, save_peft_adapter
from moesaic.peft.lora_linear import LoRAExpertsLinear, PeftMergeError
from moesaic.peft.lora_stacked import StackedLoRA

__all__ = ["LoRAExperts", "LoRAExpertsConfig", "LoRAExpertsLinear", "PeftMergeError", "StackedLoRA",
           "inject_lora_experts_", "load_lora_experts_", "save_lora_experts", "save_peft_adapter", "lora_modules",
           "merge_", "trainable_parameters", "unmerge_"]
