"""Recovery distillation after MoEfication: fit the split experts so the sparse model matches the dense one.

MoEfication (Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts")
keeps most of a ReLU model's quality with a fraction of the neurons because an inactive ReLU neuron
outputs exactly zero. GELU models (BERT, MiniLM) have no such zeros: the unselected neurons' small outputs
add up, layer after layer (docs/convert.md, "moefy": even the oracle router keeps only 0.87 cosine at 50 %
active on MiniLM). The papers that split GELU/SiLU models recover with training after the split (LLaMA-MoE,
Zhu et al. 2024, continued pre-training; MoEfication's own relu-fication step fine-tunes). This is the
cheap form of that step: distil the dense model into the MoEfied one on the calibration inputs, training
only the expert weights (and the FFN output bias) with the routers frozen and the sparse top-k selection in
the forward pass, so the experts learn to absorb what the dropped neurons contributed.

The objective follows the model's output: an encoder (``.last_hidden_state``) is matched by the cosine of
its attention-mask mean-pooled states (the sentence embedding of Reimers & Gurevych 2019); a causal LM by the
KL divergence of its next-token distributions (Hinton et al. 2015). The teacher runs without gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.core.errors import ConversionError
from moesaic.moe.moefied import MoEfiedFFN

Call = tuple[tuple[Any, ...], dict[str, Any]]


def capture_calls(model: nn.Module, calibrate: Callable[[nn.Module], object]) -> list[Call]:
    """The ``(args, kwargs)`` of every top-level forward call that ``calibrate(model)`` makes (detached)."""
    calls: list[Call] = []

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        det = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
        calls.append((tuple(det(a) for a in args), {k: det(v) for k, v in kwargs.items()}))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            calibrate(model)
    finally:
        handle.remove()
    if not calls:
        raise ConversionError("moefy.recover_steps: the calibration function never called the model")
    return calls


def _rows(call: Call, idx: Tensor) -> Call:
    """The rows ``idx`` of a batched call: every tensor argument whose first dimension is the batch's."""
    args, kwargs = call
    B = args[0].shape[0]
    pick = lambda v: v[idx] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == B else v  # noqa: E731
    return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}


def distill_loss(student_out: Any, teacher_out: Any, call: Call) -> Tensor:
    """1 - cosine of mean-pooled states (encoders) or KL(teacher || student) of the next-token distribution."""
    hs = getattr(student_out, "last_hidden_state", None)
    if hs is not None:
        ht: Tensor = teacher_out.last_hidden_state
        mask = call[1].get("attention_mask")
        m_BS1 = (mask if mask is not None else hs.new_ones(hs.shape[:2])).unsqueeze(-1).to(hs.dtype)
        pool = lambda h: (h * m_BS1).sum(1) / m_BS1.sum(1).clamp_min(1e-9)  # noqa: E731
        return (1 - F.cosine_similarity(pool(hs), pool(ht), dim=-1)).mean()
    ls = getattr(student_out, "logits", student_out)
    lt = getattr(teacher_out, "logits", teacher_out)
    if not isinstance(ls, Tensor) or not isinstance(lt, Tensor):
        raise ConversionError(f"moefy.recover_steps: cannot distil a model whose output is {type(student_out).__name__}"
                              " (need .last_hidden_state or logits)")
    V = ls.shape[-1]
    return F.kl_div(F.log_softmax(ls.reshape(-1, V), -1), F.log_softmax(lt.reshape(-1, V), -1),
                    log_target=True, reduction="batchmean")


def recover_(student: nn.Module, teacher: nn.Module, calls: Sequence[Call], *, steps: int, lr: float,
             batch: int, seed: int = 0) -> list[float]:
    """Train the MoEfied FFNs' expert weights of ``student`` for ``steps`` AdamW steps to match ``teacher``
    on random row subsets (``batch`` rows) of the captured calibration ``calls``; routers stay frozen.
    Returns the loss per step. Other parameters keep their values and ``requires_grad`` flags."""
    ffns = [m for m in student.modules() if isinstance(m, MoEfiedFFN)]
    if not ffns:
        raise ConversionError("moefy.recover_steps: the model has no MoEfied FFN to recover")
    params = [p for m in ffns for p in (m.w_in_EHD, m.b_in_EH, m.w_out_EDF, m.b_out_D)]
    flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    was_training = student.training
    student.eval()
    teacher.eval()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    try:
        for _ in range(steps):
            call = calls[int(torch.randint(len(calls), (1,), generator=g))]
            B = call[0][0].shape[0]
            sub = _rows(call, torch.randperm(B, generator=g)[:batch])
            with torch.no_grad():
                t_out = teacher(*sub[0], **sub[1])
            loss = distill_loss(student(*sub[0], **sub[1]), t_out, sub)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for p in student.parameters():
            p.requires_grad_(flags.get(id(p), True))
            p.grad = None
        student.train(was_training)
    return losses
