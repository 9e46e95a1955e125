"""Serving a Hugging Face folder (a tiny Mixtral built from a config and saved with `save_pretrained`, a
byte-level BPE `tokenizer.json`, a chat template in `tokenizer_config.json`): the model's own template
formats chat messages, greedy output equals `moesaic generate` on the folder, and several clients at once
are decoded together (continuous batching)."""

import json
import threading
import urllib.request

import pytest
import torch

import moesaic
from moesaic.cli import main
from moesaic.serve import ServeConfig, build_app, serve_in_thread
from moesaic.serve.chat import ChatFormatter, load_chat_template
from moesaic.train.tokenizer import BPETokenizer

from .conftest import openai

transformers = pytest.importorskip("transformers")

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-mixtral")
    tok = BPETokenizer.train(["to be or not to be, that is the question; whether 'tis nobler"] * 8, vocab_size=280)
    cfg = transformers.MixtralConfig(vocab_size=tok.vocab_size, hidden_size=16, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=256, num_hidden_layers=2,
                                     intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                     eos_token_id=tok.eos_id, pad_token_id=0, bos_token_id=1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(str(folder))
    tok.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return folder


def test_hf_folder_chat_template_generate_equality_and_batching(hf_dir, capsys):
    model = moesaic.load(hf_dir)
    template = load_chat_template(hf_dir)
    assert template == TEMPLATE
    app = build_app(model, ServeConfig(model_name="mixtral"), chat_template=template, max_batch=4, context=128)
    with serve_in_thread(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = c.completions.create(model="mixtral", prompt="to be or", max_tokens=12, temperature=0)
        capsys.readouterr()
        assert main(["generate", str(hf_dir), "--prompt", "to be or", "--temperature", "0", "--max-new-tokens", "12",
                     "--json"]) == 0
        ref = json.loads(capsys.readouterr().out)
        assert r.choices[0].text == ref["text"] and r.usage.completion_tokens == ref["completion_tokens"]
        # --context 128 (the model has 256): prompt + max_tokens beyond it is a 400
        with pytest.raises(openai.BadRequestError, match="served context"):
            c.completions.create(model="mixtral", prompt="to be or", max_tokens=128, temperature=0)
        # the model's template, with its eos token, formats chat messages
        msgs = [{"role": "user", "content": "to be"}]
        prompt = ChatFormatter(TEMPLATE, eos_token="<|eos|>").format([("user", "to be")])
        assert prompt == "<|user|>to be<|eos|><|assistant|>"
        chat = c.chat.completions.create(model="mixtral", messages=msgs, max_tokens=8, temperature=0)
        comp = c.completions.create(model="mixtral", prompt=prompt, max_tokens=8, temperature=0)
        assert chat.choices[0].message.content == comp.choices[0].text
        assert chat.usage.prompt_tokens == comp.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
        # 6 clients at once: decoded in shared steps (rows per step > 1), every request answered
        outs = {}

        def client(i):
            outs[i] = c.completions.create(model="mixtral", prompt="to be or not"[: 4 + i], max_tokens=20, seed=i,
                                           temperature=0.8)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(outs) == list(range(6)) and all(o.usage.completion_tokens >= 1 for o in outs.values())
        metrics = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
        rows = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in metrics.splitlines()
                if ln.startswith("moesaic_decode_step_rows_")}
        assert rows["moesaic_decode_step_rows_sum"] > rows["moesaic_decode_step_rows_count"]  # some steps batched
