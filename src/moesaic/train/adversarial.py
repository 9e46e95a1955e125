"""L-infinity PGD (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks") in the
input space of a model, and the robust accuracy of a classifier under it.

:func:`pgd_attack` maximises a loss over the box ``|x' - x|_inf <= eps`` intersected with the valid input range
``[lo, hi]`` (pixel values of images): an optional uniform random start in the box, then ``steps`` signed
gradient steps of size ``alpha``, each followed by the projection back onto the box. It takes the gradient with
respect to the input only (:func:`torch.autograd.grad`), so no parameter gradient is written, and runs with
gradients enabled even under ``torch.no_grad`` (the exact-aux pre-pass of the trainer runs objectives there).
The result is detached. :func:`robust_accuracy` is the classification accuracy on PGD examples of every eval
batch (the model in eval mode, a seeded random start: repeatable). Used by the ``advmoe`` training objective
(:mod:`moesaic.train.objectives.advmoe`) and by ``moesaic eval --pgd-eps`` (docs/zoo.md, "AdvMoE").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from moesaic.train.loss import IGNORE_INDEX
from moesaic.train.task import LMTask


def project(x_adv: Tensor, x: Tensor, eps: float, lo: float, hi: float) -> Tensor:
    """``x_adv`` clipped to the L-inf ball of radius ``eps`` around ``x``, then to ``[lo, hi]``."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(lo, hi)


def pgd_attack(loss_fn: Callable[[Tensor], Tensor], x: Tensor, eps: float, alpha: float, steps: int,
               lo: float = 0.0, hi: float = 1.0, random_start: bool = True,
               generator: torch.Generator | None = None) -> Tensor:
    """An adversarial ``x'`` with ``|x' - x|_inf <= eps`` and ``lo <= x' <= hi`` that raises ``loss_fn(x')``
    (a scalar): PGD with ``steps`` sign-gradient steps of size ``alpha`` (Madry et al. 2018). ``x`` is assumed
    inside ``[lo, hi]``; ``eps = 0`` or ``steps = 0`` without a random start returns ``x``."""
    x = x.detach()
    x_adv = x.clone()
    if random_start and eps > 0:
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) if generator is not None \
            else torch.rand_like(x)
        x_adv = project(x + (2 * u - 1) * eps, x, eps, lo, hi)
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (g,) = torch.autograd.grad(loss_fn(x_adv), x_adv)
            x_adv = project(x_adv.detach() + alpha * g.sign(), x, eps, lo, hi)
    return x_adv.detach()


@contextlib.contextmanager
def frozen(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` off for ``params`` inside the block (restored after): forwards run inside build no
    graph to them, so a later backward leaves their ``.grad`` None and AdamW does not touch them."""
    ps = [p for p in params if p.requires_grad]
    for p in ps:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in ps:
            p.requires_grad_(True)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block, its mode restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def batch_attack(model: nn.Module, task: LMTask, batch: dict[str, Tensor], key: str, eps: float, alpha: float,
                 steps: int, lo: float, hi: float, random_start: bool = True,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """``batch`` with its input ``key`` replaced by PGD examples against ``model``'s task loss (the model is
    run in eval mode and with its parameters frozen during the attack; both restored)."""

    def loss(x: Tensor) -> Tensor:
        return task.loss_sum(task.logits(model, {**batch, key: x}), batch["labels"])[0]

    with eval_mode(model), frozen(model.parameters()):
        x_adv = pgd_attack(loss, batch[key], eps, alpha, steps, lo, hi, random_start, generator)
    return {**batch, key: x_adv}


def robust_accuracy(model: nn.Module, task: LMTask, batches: Iterable[dict[str, Tensor]], eps: float,
                    steps: int, alpha: float | None = None, key: str = "pixel_values", lo: float = 0.0,
                    hi: float = 1.0, seed: int = 0) -> float:
    """Accuracy of ``model`` on PGD examples (``steps`` steps, ``alpha`` default ``2.5 eps / steps``, a random
    start drawn from a generator seeded with ``seed``) of every batch; the model in eval mode."""
    a = alpha if alpha is not None else 2.5 * eps / max(steps, 1)
    g = torch.Generator().manual_seed(seed)
    correct = n = 0
    for b in batches:
        adv = batch_attack(model, task, b, key, eps, a, steps, lo, hi, True, g)
        with eval_mode(model), torch.no_grad():
            pred = task.logits(model, adv).argmax(-1)
        valid = b["labels"] != IGNORE_INDEX
        correct += int((pred[valid] == b["labels"][valid]).sum())
        n += int(valid.sum())
    return correct / max(n, 1)
