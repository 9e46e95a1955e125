"""``moesaic convert moefy|prune|merge|densify IN OUT``: every verb end to end through the CLI on real tiny
models (Hugging Face Llama and BERT folders, moesaic MoE checkpoints); the output loads with
``moesaic.load``, runs, and equals the Python transform (or the dense model where the verb is exact);
refusals are one ``error:`` line, exit code 2 and no OUT."""

from __future__ import annotations

import json

import pytest
import torch

import moesaic
from convert_fixtures import TEXT, hf_bert, hf_llama, moe_checkpoint
from moesaic.cli import main
from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.layer import MoELayer
from moesaic.moe.moefied import MoEfiedFFN
from moesaic.transforms.merge import MergeConfig, merge_
from moesaic.transforms.prune import PruneConfig, prune_

IDS = torch.randint(4, 30, (2, 12), generator=torch.Generator().manual_seed(3))


def _convert(*argv: str) -> torch.nn.Module:
    assert main(["convert", *argv]) == 0
    return moesaic.load(argv[-1] if "--set" not in argv else argv[argv.index("--set") - 1])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS % model.cfg.vocab_size).logits


def test_moefy_hf_llama_exact_with_every_expert_and_sparse_runs(tmp_path) -> None:
    ref = hf_llama(tmp_path / "llama")
    full = _convert("moefy", str(tmp_path / "llama"), str(tmp_path / "all"), "--set", "num_experts=4",
                    "--set", "active_fraction=1.0")
    assert sum(isinstance(m, MoEfiedFFN) for m in full.modules()) == 2
    torch.testing.assert_close(_logits(full), ref(IDS).logits, atol=1e-5, rtol=0)
    half = _convert("moefy", str(tmp_path / "llama"), str(tmp_path / "half"), "--set", "num_experts=4",
                    "--set", "router=avgk", "--set", "active_fraction=0.5")
    mlp = half.model.layers[0].mlp
    assert isinstance(mlp, MoEfiedFFN) and mlp.top_k == 2 and mlp.num_experts == 4
    out = _logits(half)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref(IDS).logits, atol=1e-3)


def test_moefy_bert_with_learned_router_from_text(tmp_path) -> None:
    hf_bert(tmp_path / "bert")
    (tmp_path / "calib.txt").write_text(TEXT)
    dense = moesaic.load(tmp_path / "bert")
    for frac, exact in (("1.0", True), ("0.5", False)):
        out = tmp_path / f"bert_moe{frac}"
        m = _convert("moefy", str(tmp_path / "bert"), str(out), "--set", "num_experts=4", "--set", "router=mlp",
                     "--set", f"active_fraction={frac}", "--set", f"data={tmp_path / 'calib.txt'}",
                     "--set", "mlp_steps=20", "--set", "mlp_hidden=8")
        assert [type(layer.mlp) for layer in m.layers] == [MoEfiedFFN, MoEfiedFFN]
        assert m.layers[0].mlp.scorer.fc1.out_features == 8
        with torch.no_grad():
            a, b = m(IDS).last_hidden_state, dense(IDS).last_hidden_state
        assert torch.allclose(a, b, atol=1e-5) == exact
        emb = moesaic.embed(m, out / "step-00000000", ["to be or not to be"], pooling="mean")
        assert emb.shape == (1, 16) and torch.isfinite(emb).all()


def test_moefy_with_recovery_distillation_through_the_cli(tmp_path) -> None:
    hf_bert(tmp_path / "bert")
    (tmp_path / "calib.txt").write_text(TEXT)
    dense = moesaic.load(tmp_path / "bert")
    common = ["--set", "num_experts=4", "--set", "router=avgk", "--set", "active_fraction=0.25",
              "--set", f"data={tmp_path / 'calib.txt'}"]
    plain = _convert("moefy", str(tmp_path / "bert"), str(tmp_path / "plain"), *common)
    rec = _convert("moefy", str(tmp_path / "bert"), str(tmp_path / "rec"), *common, "--set", "recover_steps=30",
                   "--set", "recover_lr=3e-3", "--set", "recover_batch=1")
    with torch.no_grad():
        want = dense(IDS).last_hidden_state.mean(1)
        gap = {n: (1 - torch.cosine_similarity(m(IDS).last_hidden_state.mean(1), want)).mean().item()
               for n, m in (("plain", plain), ("rec", rec))}
    assert gap["rec"] < gap["plain"], gap
    assert torch.equal(rec.layers[0].mlp.scorer.centres_ED, plain.layers[0].mlp.scorer.centres_ED)


def test_prune_and_merge_equal_the_python_transforms(tmp_path) -> None:
    moe_checkpoint(tmp_path / "moe", shared=1)
    (tmp_path / "calib.txt").write_text(TEXT)
    for verb, sets, fn in [
        ("prune", ["by=random", "keep=4"], lambda m: prune_(m, PruneConfig(by="random", keep=4))),
        ("merge", ["method=ot", "num_experts=2"], lambda m: merge_(m, MergeConfig(method="ot", num_experts=2))),
        ("merge", ["method=average", "fraction=0.5"], lambda m: merge_(m, MergeConfig(method="average"))),
    ]:
        out = tmp_path / f"{verb}-{sets[0]}"
        got = _convert(verb, str(tmp_path / "moe"), str(out), *[a for s in sets for a in ("--set", s)])
        want = moesaic.load(tmp_path / "moe")
        fn(want)
        layer = got.model.layers[1].mlp
        assert isinstance(layer, MoELayer) and layer.num_experts == want.model.layers[1].mlp.num_experts < 8
        assert got.cfg.moe.num_experts == layer.num_experts and not got.cfg.module_swaps
        torch.testing.assert_close(_logits(got), _logits(want), atol=1e-6, rtol=0)
    used = _convert("prune", str(tmp_path / "moe"), str(tmp_path / "usage"), "--set", "by=usage",
                    "--set", f"data={tmp_path / 'calib.txt'}", "--set", "keep_fraction=0.25")
    assert used.model.layers[0].mlp.num_experts == 2 and torch.isfinite(_logits(used)).all()
    prov = json.loads((tmp_path / "usage" / "step-00000000" / "convert.json").read_text())
    assert prov["verb"] == "prune" and prov["config"]["by"] == "usage"


def test_upcycle_then_densify_is_the_dense_model_again(tmp_path) -> None:
    ref = hf_llama(tmp_path / "llama")
    _convert("upcycle", str(tmp_path / "llama"), str(tmp_path / "moe"), "--set", "drop_fraction=0.0")
    dense = _convert("densify", str(tmp_path / "moe"), str(tmp_path / "dense"))
    assert all(type(layer.mlp) is DenseFFN for layer in dense.model.layers)  # rebuilt from the config
    assert len(dense.cfg.module_swaps) == 1 and dense.cfg.module_swaps[0].dense is not None
    torch.testing.assert_close(_logits(dense), ref(IDS).logits, atol=1e-5, rtol=0)


def test_refusals_are_one_line_and_leave_no_output(tmp_path, capsys) -> None:
    hf_llama(tmp_path / "llama")
    hf_bert(tmp_path / "bert")
    moe_checkpoint(tmp_path / "moe")
    capsys.readouterr()
    llama, bert, moe = (str(tmp_path / n) for n in ("llama", "bert", "moe"))
    cases = [
        (["moefy", moe, "--set", "num_experts=4"], "no FFN found"),
        (["moefy", llama, "--set", "gated=no"], "SwiGLU"),
        (["moefy", bert, "--set", "gated=yes"], "GELU"),
        (["moefy", bert, "--set", "activation=silu"], "requires silu"),
        (["moefy", llama, "--set", "num_experts=5"], "divisible"),
        (["moefy", llama, "--set", "router=mlp"], "data=TEXT_FILE"),
        (["moefy", llama, "--set", "recover_steps=3"], "recover_steps > 0 needs calibration text"),
        (["moefy", bert, "--set", "router=mlp", "--set", "data=/no/such/file.txt"], "no such text file"),
        (["prune", llama, "--set", "by=random"], "no MoE layer"),
        (["prune", moe, "--set", "by=usage"], "data=TEXT_FILE"),
        (["prune", moe, "--set", "by=random", "--set", "keep=9"], "only 8 experts"),
        (["merge", moe, "--set", "num_experts=3"], "divisible"),
        (["merge", bert], "no MoE layer"),
        (["densify", llama], "no MoE layer"),
        (["densify", moe, "--set", "method=svd"], "method"),
        (["prune", moe, moe, "--set", "by=random"], "takes 1 input"),
    ]
    for i, (args, why) in enumerate(cases):
        verb, *rest = args
        ins = [a for a in rest if not a.startswith("--set") and "=" not in a]
        sets = rest[len(ins):]
        out = tmp_path / f"out{i}"
        assert main(["convert", verb, *ins, str(out), *sets]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and why in err, (args, err)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "llama", "moe"]  # no temporary folders


def test_verbs_are_listed(capsys) -> None:
    assert main(["list"]) == 0
    conv = capsys.readouterr().out.split("converters:")[1]
    for verb in ("moefy", "prune", "merge", "densify", "upcycle"):
        assert verb in conv


@pytest.mark.parametrize("verb", ["moefy", "prune", "merge", "densify"])
def test_help_names_the_verb(verb, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["convert", verb, "--help"])
    assert "--set" in capsys.readouterr().out
