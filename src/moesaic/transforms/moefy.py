"""``moefy``: turn every dense FFN of a model into a :class:`~moesaic.moe.moefied.MoEfiedFFN` in place.

Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts" (neuron split by
balanced k-means of the keys or by co-activation; similarity or MLP expert selection) and Qiu et al. 2023,
"Emergent Modularity in Pre-trained Transformers" (EMoE: avg-k gating, the mean pre-activation of the
expert's neurons). The routers (``router``):

* ``centroid``: similarity to the balanced k-means centre of the expert's normalised keys (MoEfication);
* ``avgk``: the mean of the expert's raw keys and biases, i.e. its mean pre-activation (EMoE);
* ``mlp``: a two-layer MLP trained on calibration activations to predict each expert's output norm
  (MoEfication's MLP selection; needs ``calibrate``);
* ``oracle``: the exact expert output norms (an upper bound; it costs the dense FFN).

``split: coactivation`` groups neurons by a co-activation graph of calibration tokens (needs
``calibrate``). ``recover_steps > 0`` then distils the dense model into the split one on the calibration
inputs at the configured active fraction (:mod:`moesaic.transforms.moefy_recover`; needs ``calibrate``).
Without recovery and with every expert active (``active_fraction: 1``) the result equals the dense FFN up to
summation order (tests check float64). Docs: docs/convert.md, "moefy".
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from moesaic.core.config import ConfigError, Section, rule
from moesaic.core.errors import ConversionError
from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.moefied import LinearScorer, MLPScorer, MoEfiedFFN
from moesaic.transforms.moefy_recover import capture_calls, recover_
from moesaic.transforms.neuron_split import balanced_kmeans, coactivation_split, key_vectors

RouterKind = Literal["centroid", "avgk", "mlp", "oracle"]
FilterFn = Callable[[str, nn.Module], bool]


@dataclasses.dataclass
class MoefyConfig(Section):
    """``num_experts`` groups of ``d_ff / num_experts`` neurons; ``active_fraction`` of them run per token."""

    num_experts: int = rule(32, ge=1)
    active_fraction: float = rule(0.5, gt=0.0, le=1.0)
    router: RouterKind = "centroid"
    split: Literal["kmeans", "coactivation"] = "kmeans"
    activation: Literal["any", "gelu", "silu", "gelu_tanh", "relu"] = "any"  # require this FFN activation
    gated: bool | None = None  # require SwiGLU-style (true) or plain GELU-style (false) FFNs; None: any
    mlp_hidden: int = rule(256, ge=1)
    mlp_steps: int = rule(400, ge=1)
    mlp_lr: float = rule(3e-3, gt=0.0)
    max_calib_tokens: int = rule(20000, ge=1)
    recover_steps: int = rule(0, ge=0)  # recovery distillation after the split (moefy_recover); 0 = none
    recover_lr: float = rule(1e-4, gt=0.0)
    recover_batch: int = rule(32, ge=1)
    seed: int = 0

    def top_k(self) -> int:
        return max(1, round(self.active_fraction * self.num_experts))


def find_ffns(model: nn.Module, filter_fn: FilterFn | None = None) -> list[tuple[str, DenseFFN]]:
    """Every :class:`DenseFFN` (by module path) accepted by ``filter_fn``; ConversionError when none."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, DenseFFN) and (filter_fn is None or filter_fn(n, m))]
    if not found:
        raise ConversionError(f"moefy: no FFN found in {type(model).__name__} (no dense FFN module"
                              f"{' passes the filter' if filter_fn is not None else ''})")
    return found


def _check_kind(name: str, ffn: DenseFFN, cfg: MoefyConfig) -> None:
    if cfg.activation != "any" and ffn.activation != cfg.activation:
        raise ConversionError(f"moefy: {name} uses {ffn.activation}, the config requires {cfg.activation}")
    if cfg.gated is not None and ffn.gated != cfg.gated:
        kinds = ("a gated (SwiGLU-style)", "a plain (GELU-style)")
        have, want = kinds if ffn.gated else kinds[::-1]
        raise ConversionError(f"moefy: {name} is {have} FFN, the config requires {want} one "
                              f"(gated: {str(cfg.gated).lower()}): SwiGLU vs GELU mismatch")
    if ffn.d_ff % cfg.num_experts:
        raise ConfigError("num_experts", cfg.num_experts, f"{name}: the FFN width {ffn.d_ff} must be divisible "
                          "by the expert count")


def _dense_parts(ffn: DenseFFN) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keys ``W_in`` ``[F, D]`` (gate rows for gated FFNs), the up rows (or keys), biases, ``W_out`` ``[D, F]``."""
    key = ffn.gate_proj if ffn.gated else ffn.up_proj
    b_in = key.bias if key.bias is not None else key.weight.new_zeros(ffn.d_ff)
    return key.weight.detach(), ffn.up_proj.weight.detach(), b_in.detach(), ffn.down_proj.weight.detach()


@torch.no_grad()
def split_ffn(ffn: DenseFFN, labels_F: Tensor, top_k: int, scorer: nn.Module | None = None) -> MoEfiedFFN:
    """Cut ``ffn`` into experts by neuron labels (equal group sizes); ``scorer`` None = oracle."""
    keys_FD, up_FD, b_in_F, w_out_DF = _dense_parts(ffn)
    E = int(labels_F.max()) + 1
    idx_EF = torch.stack([torch.nonzero(labels_F == e).flatten() for e in range(E)])
    if ffn.gated:
        w_in = torch.cat([keys_FD[idx_EF], up_FD[idx_EF]], dim=1)
        ub = ffn.up_proj.bias
        b_up_EF = ub.detach()[idx_EF] if ub is not None else torch.zeros_like(b_in_F[idx_EF])
        b_in = torch.cat([b_in_F[idx_EF], b_up_EF], 1)
    else:
        w_in, b_in = keys_FD[idx_EF], b_in_F[idx_EF]
    w_out_EDF = w_out_DF[:, idx_EF].permute(1, 0, 2)
    b_out = ffn.down_proj.bias.detach() if ffn.down_proj.bias is not None else w_out_DF.new_zeros(ffn.d_model)
    return MoEfiedFFN(w_in, b_in, w_out_EDF, b_out, activation=ffn.activation, gated=ffn.gated, top_k=top_k,
                      scorer=scorer, neuron_idx_EF=idx_EF)


def linear_router(kind: str, ffn: DenseFFN, labels_F: Tensor) -> LinearScorer:
    """``centroid``: mean normalised key of each group; ``avgk``: mean raw key and mean bias (EMoE)."""
    keys_FD, _, b_in_F, _ = _dense_parts(ffn)
    idx_EF = torch.stack([torch.nonzero(labels_F == e).flatten() for e in range(int(labels_F.max()) + 1)])
    if kind == "centroid":
        k = torch.from_numpy(key_vectors(keys_FD)).to(keys_FD.dtype)
        return LinearScorer(k[idx_EF].mean(1))
    return LinearScorer(keys_FD[idx_EF].mean(1), b_in_F[idx_EF].mean(1))


def train_mlp_router(moe: MoEfiedFFN, x_ND: Tensor, cfg: MoefyConfig) -> MLPScorer:
    """Fit an :class:`MLPScorer` to each token's expert output norms, normalised per token (MSE)."""
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        t_NE = moe.expert_norms(x_ND)
        t_NE = t_NE / t_NE.mean(-1, keepdim=True).clamp_min(1e-12)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        mlp = MLPScorer(moe.d_model, cfg.mlp_hidden, moe.num_experts).to(x_ND.dtype)
    opt = torch.optim.Adam(mlp.parameters(), lr=cfg.mlp_lr)
    bs = min(1024, x_ND.shape[0])
    for _ in range(cfg.mlp_steps):
        i = torch.randint(0, x_ND.shape[0], (bs,), generator=g)
        loss = (mlp(x_ND[i]) - t_NE[i]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mlp.requires_grad_(True)


def _calibration_inputs(model: nn.Module, ffns: list[tuple[str, DenseFFN]], calibrate: Callable[[nn.Module], object],
                        max_tokens: int) -> dict[str, Tensor]:
    """FFN inputs ``[N, D]`` per FFN, collected by forward hooks while ``calibrate(model)`` runs."""
    got: dict[str, list[Tensor]] = {n: [] for n, _ in ffns}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: got[n].append(args[0].detach().reshape(
        -1, args[0].shape[-1]))) for n, m in ffns]
    try:
        with torch.no_grad():
            calibrate(model)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, xs in got.items():
        if not xs:
            raise ConversionError(f"moefy: calibration never ran {n}")
        x = torch.cat(xs)
        if x.shape[0] > max_tokens:
            x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_tokens]]
        out[n] = x
    return out


def _neuron_activations(ffn: DenseFFN, x_ND: Tensor) -> Tensor:
    keys_FD, _, b_in_F, _ = _dense_parts(ffn)
    return (x_ND @ keys_FD.t() + b_in_F) > 0


def moefy_(model: nn.Module, cfg: MoefyConfig | None = None, filter_fn: FilterFn | None = None, *,
           calibrate: Callable[[nn.Module], object] | None = None) -> dict[str, MoEfiedFFN]:
    """Replace every dense FFN (accepted by ``filter_fn(name, module)``) by its MoEfied split, in place.
    ``calibrate(model)`` runs the model on calibration data (needed by ``router: mlp`` and ``split:
    coactivation``). All checks run before the first FFN is replaced. Returns the new modules by path."""
    cfg = cfg or MoefyConfig()
    ffns = find_ffns(model, filter_fn)
    for name, ffn in ffns:
        _check_kind(name, ffn, cfg)
    needs_calib = cfg.router == "mlp" or cfg.split == "coactivation"
    if (needs_calib or cfg.recover_steps) and calibrate is None:
        field = "router" if cfg.router == "mlp" else "split" if needs_calib else "recover_steps"
        raise ConfigError(field, getattr(cfg, field), "needs calibration data (calibrate=...)")
    teacher, calls = None, []
    if cfg.recover_steps and calibrate is not None:
        # Run the user's calibration once: its captured calls feed both the FFN inputs and the recovery.
        calls = capture_calls(model, calibrate)
        teacher = copy.deepcopy(model)
        calibrate = lambda m: [m(*args, **kwargs) for args, kwargs in calls]  # noqa: E731
    xs = _calibration_inputs(model, ffns, calibrate, cfg.max_calib_tokens) if calibrate and needs_calib else {}
    new: dict[str, MoEfiedFFN] = {}
    for name, ffn in ffns:
        if cfg.split == "coactivation":
            labels = coactivation_split(_neuron_activations(ffn, xs[name]), cfg.num_experts, cfg.seed)
        else:
            labels = balanced_kmeans(key_vectors(_dense_parts(ffn)[0]), cfg.num_experts, cfg.seed)
        labels_F = torch.from_numpy(labels)
        moe = split_ffn(ffn, labels_F, cfg.top_k())
        if cfg.router in ("centroid", "avgk"):
            moe.scorer = linear_router(cfg.router, ffn, labels_F)
        elif cfg.router == "mlp":
            moe.scorer = train_mlp_router(moe, xs[name].to(moe.w_in_EHD.dtype), cfg)
        moe.train(ffn.training)
        new[name] = moe
    for name, moe in new.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, moe)
    if teacher is not None:
        recover_(model, teacher, calls, steps=cfg.recover_steps, lr=cfg.recover_lr, batch=cfg.recover_batch,
                 seed=cfg.seed)
    return new


def set_active_(model: nn.Module, active_fraction: float) -> int:
    """Set the fraction of experts every :class:`MoEfiedFFN` of ``model`` runs; returns the count of layers."""
    if not 0.0 < active_fraction <= 1.0:
        raise ConfigError("active_fraction", active_fraction, "must be in (0, 1]")
    layers = [m for m in model.modules() if isinstance(m, MoEfiedFFN)]
    for m in layers:
        m.top_k = max(1, round(active_fraction * m.num_experts))
    return len(layers)
