"""moesaic.generate / moesaic.complete / DecodeSession: batched left-padded greedy equals per-prompt greedy
(tokens exactly; next-token logits within 1e-5 in float32 and 1e-10 in float64), seeded sampling reproduces
alone, batched and under continuous batching, stop strings and the streaming callback, typed errors."""

import pytest
import torch

import moesaic
from decode_fixtures import tiny_lm
from moesaic.core.errors import ConfigError
from moesaic.inference import CapacityError, DecodeSession, SamplingParams, StopTextStream
from moesaic.models.generation import generate as legacy_generate
from moesaic.train.tokenizer import CharTokenizer

PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 2, 4, 11], [1], [12, 4, 4, 9, 2]]


def per_prompt(model, ids, n, **kw):
    sess = DecodeSession(model, 1, keep_logits=True)
    sess.add(ids, SamplingParams(max_new_tokens=n, **kw))
    evs = []
    sess.run(evs.append)
    return [e.token_id for e in evs], torch.stack([e.logits for e in evs])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_batched_left_padded_greedy_equals_per_prompt(dtype, tol):
    m = tiny_lm(dtype)
    sess = DecodeSession(m, len(PROMPTS), keep_logits=True)
    sids = sess.add_batch(PROMPTS, [SamplingParams(max_new_tokens=12)] * len(PROMPTS))
    got: dict[int, list] = {s: [] for s in sids}
    sess.run(lambda e: got[e.seq_id].append(e))
    for s, ids in zip(sids, PROMPTS, strict=True):
        toks, logits = per_prompt(m, ids, 12)
        assert [e.token_id for e in got[s]] == toks
        torch.testing.assert_close(torch.stack([e.logits for e in got[s]]), logits, atol=tol, rtol=0)


def test_generate_matches_legacy_and_left_padded_batch():
    m = tiny_lm()
    ids = torch.tensor([PROMPTS[1]])
    assert torch.equal(moesaic.generate(m, ids, 10), legacy_generate(m, ids, 10))
    P = max(len(p) for p in PROMPTS)
    ids_BP = torch.tensor([[0] * (P - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in PROMPTS])
    out = moesaic.generate(m, ids_BP, 10, attention_mask=mask)
    assert torch.equal(out[:, :P], ids_BP)
    for b, p in enumerate(PROMPTS):
        assert out[b, P:].tolist() == moesaic.generate(m, torch.tensor([p]), 10)[0, len(p):].tolist()


def test_continuous_batching_equals_alone():
    """Rows join while others run (cache shifted right for a longer prompt, compacted left at the end)."""
    m = tiny_lm()
    want = [per_prompt(m, p, 9)[0] for p in PROMPTS]
    got = [c.token_ids for c in moesaic.complete(m, PROMPTS, max_new_tokens=9, max_batch=2)]
    assert got == want
    sess = DecodeSession(m, 2, max_len=20)
    a = sess.add(PROMPTS[0], SamplingParams(max_new_tokens=9))
    out: dict[int, list[int]] = {a: []}
    for _ in range(4):
        for e in sess.step():
            out[e.seq_id].append(e.token_id)
    b = sess.add(PROMPTS[1], SamplingParams(max_new_tokens=9))  # longer than the cursor: shift right
    out[b] = []
    sess.run(lambda e: out[e.seq_id].append(e.token_id))
    assert out[a] == want[0] and out[b] == want[1]


def test_seeded_sampling_reproduces():
    m = tiny_lm()
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=8, seed=7)
    a = [c.token_ids for c in moesaic.complete(m, PROMPTS, **kw)]
    b = [c.token_ids for c in moesaic.complete(m, PROMPTS, **kw, max_batch=1)]
    c = [c.token_ids for c in moesaic.complete(m, PROMPTS[::-1], **{**kw, "seed": None}, max_batch=2)]
    assert a == b
    assert a != [c.token_ids for c in moesaic.complete(m, PROMPTS, **{**kw, "seed": 8})]
    assert len(c) == 4
    g = moesaic.generate(m, torch.tensor([PROMPTS[1]]), 8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g, moesaic.generate(m, torch.tensor([PROMPTS[1]]), 8, temperature=1.0,
                                           generator=torch.Generator().manual_seed(3)))


def test_stop_token_stop_string_and_streaming():
    m = tiny_lm()
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ,.!?")  # 31 chars + eos = vocab 32
    free = moesaic.complete(m, "to be", tokenizer=tok, max_new_tokens=20, stop_token_ids=[])[0]
    assert free.finish_reason == "length" and free.completion_tokens == 20
    text = free.text
    assert text == tok.decode(free.token_ids)
    stop = text[5:7]  # a stop string the greedy completion is known to contain
    streamed: list[str] = []
    c = moesaic.complete(m, "to be", tokenizer=tok, max_new_tokens=20, stop=[stop], stop_token_ids=[],
                         on_token=lambda i, t, d: streamed.append(d))[0]
    cut = text.find(stop)
    assert c.finish_reason == "stop" and c.text == text[:cut] and "".join(streamed) == text[:cut]
    assert c.token_ids == free.token_ids[:len(c.token_ids)] and len(c.token_ids) <= 7
    t0 = free.token_ids[3]
    c2 = moesaic.complete(m, "to be", tokenizer=tok, max_new_tokens=20, stop_token_ids=[t0])[0]
    assert c2.finish_reason == "stop" and c2.token_ids == free.token_ids[:free.token_ids.index(t0) + 1]
    c3 = moesaic.complete(m, ["to be", "or"], tokenizer=tok, max_new_tokens=20, stop_token_ids=[],
                          on_token=lambda i, t, d: i != 1)  # cancel row 1 at its first token
    assert c3[1].finish_reason == "cancelled" and c3[1].completion_tokens == 1 and c3[0].completion_tokens == 20


def test_stop_stream_holds_back_partial_stop():
    tok = CharTokenizer("abc")
    s = StopTextStream(tok, ["bc"])
    assert s.push(0) == ("a", False)
    assert s.push(1) == ("", False)        # "b" may start "bc"
    assert s.push(0) == ("ba", False)      # it did not
    assert s.push(1) == ("", False)
    assert s.push(2) == ("", True) and s.text == "aba"


def test_bad_options_are_typed_errors():
    m = tiny_lm()
    for kw in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0)):
        with pytest.raises(ConfigError):
            moesaic.complete(m, [[1, 2]], **kw)
    with pytest.raises(ConfigError, match="context"):
        moesaic.generate(m, torch.tensor([[1, 2]]), 100)
    with pytest.raises(ConfigError, match="tokenizer"):
        moesaic.complete(m, "hello")
    sess = DecodeSession(m, 1)
    sess.add([1, 2], SamplingParams(max_new_tokens=5))
    with pytest.raises(CapacityError):
        sess.add([1, 2], SamplingParams(max_new_tokens=5))


@pytest.mark.parametrize("attention", [{"kind": "mla", "num_heads": 2},
                                       {"kind": "mha", "num_heads": 4, "num_key_value_heads": 2,
                                        "sliding_window": 4}])
def test_static_cache_other_attention_kinds_match_model_generate(attention):
    """MLA caches its latent (other tensor shapes), a sliding window masks by column: both through the
    static cache give the tokens of the model's own concatenating cache, left-padded batch included."""
    from moesaic.core.config import parse, validate_tree
    from moesaic.models.decoder import DecoderLM, DecoderLMConfig

    torch.manual_seed(0)
    data = {"vocab_size": 32, "d_model": 16, "num_layers": 2, "d_ff": 32, "max_seq_len": 48,
            "attention": attention, "moe": {"d_ff": 32, "num_experts": 4, "top_k": 2}}
    m = DecoderLM(validate_tree(parse(DecoderLMConfig, data, "model"), "model")).eval()
    P = max(len(p) for p in PROMPTS)
    ids_BP = torch.tensor([[0] * (P - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in PROMPTS])
    assert torch.equal(moesaic.generate(m, ids_BP, 10, attention_mask=mask),
                       m.generate(ids_BP, max_new_tokens=10, attention_mask=mask))
