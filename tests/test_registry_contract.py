"""Contract tests parametrized over every registry entry (docs/design.md, "Contract tests"): every entry is
documented and listed, its default Config names it, and every model, attention, dataset and schedule kind
builds from its default Config (on tiny sizes) and works. Routers, dispatchers, experts and expert backends
have their own contract tests next to their packages; HF architectures in tests/interop/test_contract.py."""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any

import pytest
import torch

from moesaic.cli import main
from moesaic.cli.list import REGISTRY_MODULES
from moesaic.core.registry import SCHEDULES, Registry
from moesaic.interop.common import HF_ARCHITECTURES
from moesaic.models.attention import ATTENTIONS
from moesaic.models.base import MODELS
from moesaic.moe.dispatch.base import DISPATCHERS
from moesaic.moe.experts.base import EXPERTS
from moesaic.moe.layer import MoEConfig
from moesaic.moe.routing.base import ROUTERS
from moesaic.train.datasets.base import DATASETS, Dataset
from moesaic.train.datasets.shakespeare import play_files
from moesaic.train.objectives.base import OBJECTIVES

for _module in REGISTRY_MODULES:
    importlib.import_module(_module)
REGISTRIES = Registry.all()
ENTRIES = [(r.kind, name) for r in REGISTRIES for name in r.names()]
COMPONENTS = [ROUTERS, DISPATCHERS, EXPERTS, ATTENTIONS, MODELS, DATASETS, SCHEDULES, OBJECTIVES]

#: Tiny sizes applied to whichever of these fields a default Config has (the rest stays default).
TINY: dict[str, Any] = {"vocab_size": 32, "d_model": 16, "d_ff": 32, "num_layers": 2, "max_seq_len": 16,
                        "d_in": 4, "tokenizer": "char", "seq_len": 16, "eval_windows": 2,
                        "files": [str(play_files()["tempest"])]}  # data.kind text: a user's text file


def tiny(cfg: Any, **more: Any) -> Any:
    fields = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in {**TINY, **more}.items() if k in fields})


def test_every_registry_is_listed_with_a_description_per_entry(capsys: pytest.CaptureFixture[str]) -> None:
    kinds = {r.kind for r in REGISTRIES}
    assert {"router", "dispatcher", "experts", "attention", "model", "dataset", "schedule", "objective",
            "HF architecture"} <= kinds
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    sections: dict[str, set[str]] = {}
    title = ""
    for line in out.splitlines():
        if not line.startswith(" "):
            title = line.rstrip(":")
            sections[title] = set()
        else:
            sections[title].add(line.split()[0])
    for reg in REGISTRIES:
        assert reg.names(), reg.kind
        plural = reg.kind if reg.kind.endswith("s") else reg.kind + "s"
        assert set(reg.names()) <= sections.get(plural, set()), reg.kind


@pytest.mark.parametrize("kind,name", ENTRIES)
def test_every_entry_is_documented(kind: str, name: str) -> None:
    reg = next(r for r in REGISTRIES if r.kind == kind)
    assert len(reg.describe(name)) > 10, (kind, name)


@pytest.mark.parametrize("reg,name", [(r, n) for r in COMPONENTS for n in r.names() if ":" not in n],
                         ids=lambda v: v if isinstance(v, str) else v.kind)
def test_default_config_names_its_entry(reg: Registry[Any], name: str) -> None:
    """The name is written once, in the registration: the Config's ``kind`` default comes from it."""
    cfg = reg.config_of(name)
    assert cfg is not None and cfg().kind == name


def test_hf_architectures_are_registered_objects() -> None:
    names = HF_ARCHITECTURES.names()
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "llama", "mistral", "qwen2", "bert",
            "distilbert"} <= set(names)
    assert all(HF_ARCHITECTURES.get(n).name == n for n in names)


# ------------------------------------------------------------------------------------------------ models

def _model_loss(name: str, model: torch.nn.Module, cfg: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if name == "moe_regression":
        return model(torch.randn(8, cfg.d_in, generator=g)).square().mean()
    if name == "vit_classifier":  # images with one task per image; logits of other tasks' classes are -inf
        out = model(torch.rand(4, cfg.image_size, cfg.image_size, generator=g), task_id=torch.tensor([0, 0, 0, 0]))
        return out.logits.float().square().mean()
    if name == "dit":  # the DDPM loss against a noise target (DiT's head starts at zero, so the output is 0)
        x = torch.randn(2, cfg.image_size, cfg.image_size, generator=g)
        eps = model(x, torch.tensor([3, 150]), torch.tensor([1, cfg.num_classes])).logits.float()
        return (eps - x).square().mean()
    if name == "ts_forecaster":
        return model(torch.randn(2, 12, generator=g)).logits.float().square().mean()
    ids = torch.randint(cfg.vocab_size, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :2] = 0
    out = model(ids, attention_mask=mask)
    # bert_encoder has no logits; sentence_encoder's are unit vectors (a constant square norm)
    h = out.last_hidden_state if name in ("bert_encoder", "sentence_encoder") else out.logits
    return h.float().square().mean()


MODEL_INPUTS = {"moe_regression", "decoder_lm", "encoder_classifier", "bert_encoder", "vit_classifier",
                "ts_forecaster", "dit", "sentence_encoder", "span_qa"}


def test_every_model_has_example_inputs() -> None:
    assert set(MODELS.names()) == MODEL_INPUTS, "add the new model kind to _model_loss"


@pytest.mark.parametrize("moe", [False, True], ids=["default", "moe"])
@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_runs_forward_and_backward(name: str, moe: bool) -> None:
    cfg = tiny(MODELS.get(name).Config())
    if moe and hasattr(cfg, "moe"):
        cfg = dataclasses.replace(cfg, moe=MoEConfig(d_ff=16, num_experts=4, top_k=2))
    torch.manual_seed(0)
    model = cfg.build()
    loss = _model_loss(name, model, cfg)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads if g is not None)


# --------------------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_every_attention_is_causal_finite_and_differentiable(name: str) -> None:
    cfg = ATTENTIONS.get(name).Config()
    torch.manual_seed(0)
    attn = ATTENTIONS.get(name)(cfg, 32)
    x_BSD = torch.randn(2, 6, 32, requires_grad=True)
    pos_BS = torch.arange(6).expand(2, 6)
    y_BSD = attn(x_BSD, pos_BS)
    assert y_BSD.shape == x_BSD.shape and torch.isfinite(y_BSD).all()
    y_BSD.square().sum().backward()
    assert x_BSD.grad is not None and torch.isfinite(x_BSD.grad).all()
    with torch.no_grad():  # causal by default: changing the last token leaves earlier outputs unchanged
        x2 = x_BSD.detach().clone()
        x2[:, -1] += 1.0
        torch.testing.assert_close(attn(x2, pos_BS)[:, :-1], y_BSD.detach()[:, :-1], rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------- datasets, schedules

@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_builds_from_its_default_config(name: str, data_cache: Any) -> None:
    cfg = tiny(DATASETS.get(name).Config())
    data = cfg.build()
    assert isinstance(data, Dataset) and data.cfg is cfg


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_builds_from_its_default_config(name: str) -> None:
    sched = SCHEDULES.get(name).Config().build()
    values = [sched.value(s) for s in (0, 1, 10, 10_000)]
    assert all(math.isfinite(v) for v in values)
    sched.on_optimizer_step(10)
    assert sched.value() == values[2] and sched.state_dict()["step"].item() == 10
