"""EvoMoE experts: one expert trained alone, then diversified into N experts at a given step (Nie et al.
2021, "EvoMoE: An Evolutional Mixture-of-Experts Training Framework via Dense-To-Sparse Gate").

The paper trains a single expert for a while and then "spawns" diverse experts from it; it does not pin
down how the copies are perturbed, so that is a choice of three methods. ``diversify_step`` is the step
at which expert 0 is copied into every expert and the copies are perturbed (:func:`diversify_`):
``method: mask`` gives
``W_i = W * M_i`` with Bernoulli(``keep_ratio``) masks (``rescale`` divides by the keep ratio), ``noise``
gives ``W_i = W + N(0, (noise_std * std W)^2)`` and ``copy`` plain copies. Until then the router should
send every token to expert 0: ``router: {kind: dts, dense_until_step: S}`` with the same S (checked).
The diversification runs once, inside ``on_optimizer_step(S)``, with a CPU generator seeded by ``seed``
(reproducible on any device); resuming after S keeps the saved, already diversified weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor

from moesaic.core.config import LayerShape, require, rule
from moesaic.moe.experts.base import EXPERTS
from moesaic.moe.experts.stacked_ffn import FFNExperts, GLUExpertsConfig
from moesaic.moe.routing.dts import DTSRouterConfig

Method = Literal["mask", "noise", "copy"]


@torch.no_grad()
def diversify_(experts: FFNExperts, base: dict[str, Tensor], method: Method = "mask", keep_ratio: float = 0.9,
               rescale: bool = False, noise_std: float = 0.01, generator: torch.Generator | None = None) -> None:
    """Set every expert's stacked tensors to a perturbed copy of ``base`` (one expert's tensors)."""
    for name, w in base.items():
        p = getattr(experts, name)
        w_E = w.to(p).unsqueeze(0).expand_as(p).clone()
        if method == "mask":
            keep = torch.rand(w_E.shape, generator=generator, device="cpu").to(p.device) < keep_ratio
            w_E = w_E * keep.to(p.dtype)
            if rescale:
                w_E = w_E / keep_ratio
        elif method == "noise":
            noise = torch.randn(w_E.shape, generator=generator, device="cpu").to(p)
            w_E = w_E + noise * (noise_std * w.float().std().item())
        elif method != "copy":
            raise ValueError(f"method = {method!r}: must be mask, noise or copy")
        p.copy_(w_E)


@dataclasses.dataclass
class EvoMoEExpertsConfig(GLUExpertsConfig):
    gated: bool = True
    diversify_step: int = rule(1000, ge=0)
    method: Method = "mask"
    keep_ratio: float = rule(0.9, gt=0.0, le=1.0)
    rescale: bool = False
    noise_std: float = rule(0.01, ge=0.0)
    seed: int = 0

    def validate_moe(self, path: str, layer: LayerShape) -> None:
        super().validate_moe(path, layer)
        r = layer.router
        if isinstance(r, DTSRouterConfig):
            require(r.dense_until_step == self.diversify_step, f"{path.rsplit('.', 1)[0]}.router.dense_until_step",
                    r.dense_until_step, f"must equal experts.diversify_step ({self.diversify_step}): the router "
                    "sends every token to expert 0 until the experts are diversified")


@EXPERTS.register("evomoe")
class EvoMoEExperts(FFNExperts):
    """EvoMoE: expert 0 trained alone, then diversified into all experts at diversify_step (Nie et al. 2021)."""

    Config = EvoMoEExpertsConfig
    cfg: EvoMoEExpertsConfig

    def __init__(self, cfg: EvoMoEExpertsConfig, d_model: int, d_ff: int, num_experts: int, **kw: Any):
        self.gated = cfg.gated  # read by FFNExperts.__init__ for the up-projection width
        super().__init__(cfg, d_model, d_ff, num_experts, **kw)

    def on_optimizer_step(self, step: int) -> None:
        if step == self.cfg.diversify_step:
            self.diversify()

    def diversify(self) -> None:
        c = self.cfg
        base = {n: getattr(self, n)[0].detach().clone() for n in self.stacked_names()}
        diversify_(self, base, c.method, c.keep_ratio, c.rescale, c.noise_std,
                   torch.Generator().manual_seed(c.seed))
