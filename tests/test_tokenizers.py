"""Tokenizers: the tokenizer.json tokenizer against transformers, LLaMA-3's chat format, tokenizer training, corpus."""
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import unicodedata

import pytest

from Models.hf_tokenizer import HFTokenizer
from Models.tokenizer import Tokenizer, load_tokenizer
from Utils.chat_template import ChatTemplate
from Utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINIMIND = os.path.join(ROOT, "data", "minimind_tokenizer")
ORACLE = os.path.join(ROOT, "tests", "oracles", "hf_tokenize.py")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=ROOT)

TEXTS = ["Hello world", "Hello, world! How are you?", "你好，世界！这是一个测试。", "机器学习 and deep learning 混合",
         "12345 67890 3.14159 -42 1e10", "2024年12月3日", "😀 emoji 🍕☕ 👨‍👩‍👧 family 🇫🇷", "  two  spaces\tand\ttabs  ",
         "line one\nline two\n\n\nthree\r\nfour", " leading space", "trailing space ", "", " ", "\n",
         "<|im_start|>user\nraw special text<|im_end|>", "naïve café – “quotes” — ½ ﬁ", "def f(x):\n    return x ** 2\n",
         "🧪" * 7 + "龘" * 3, "a" * 300]

CHATS = [
    ([{"role": "user", "content": "What is 2+3?"}], False),
    ([{"role": "user", "content": "What is 2+3?"}], True),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好"},
      {"role": "assistant", "content": "你好！有什么可以帮你？"}], False),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi 😀"},
      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2 + 2 = ?"},
      {"role": "assistant", "content": "4, of course.\n"}, {"role": "user", "content": "thanks"}], True),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nsteps\n</think>\n\nanswer"}], False),
]


def hf_oracle(directory, **request):
    """transformers' answers for `directory`, from a separate process (torch/transformers stay out of this one)."""
    assert importlib.util.find_spec("transformers") is not None, \
        "transformers is the oracle of these tests: pip install -r requirements-test.txt"
    request = dict(request, dir=directory)
    r = subprocess.run([sys.executable, ORACLE], input=json.dumps(request), capture_output=True, text=True,
                       env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def chat_request(chats, masks=False):
    return {"chats": [{"messages": m, "add_generation_prompt": g} for m, g in chats], "assistant_masks": masks}


# ---- minimind's real tokenizer against transformers ----

@pytest.fixture(scope="module")
def minimind():
    tok = HFTokenizer(MINIMIND)
    ids = [tok.encode(s, False, False) for s in TEXTS] + [[1, 300, 2, 0, 5000], [4544, 282], [282, 258]]
    oracle = hf_oracle(MINIMIND, texts=TEXTS, ids=ids, **chat_request(CHATS))
    return tok, ids, oracle


def test_transformers_oracle_is_installed():
    assert importlib.util.find_spec("transformers") is not None, "install requirements-test.txt"


def test_minimind_encode_decode_match_transformers(minimind):
    tok, ids, oracle = minimind
    assert [tok.encode(s, False, False) for s in TEXTS] == oracle["encode"]
    assert [tok.decode(t) for t in ids] == oracle["decode"]
    assert [tok.decode(tok.encode(s, False, False)) for s in TEXTS] == TEXTS
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_tokens) == (6400, 1, 2, 0, {2})
    assert tok.encode("hi", bos=True, eos=True) == [1] + tok.encode("hi", False, False) + [2]


def test_minimind_chat_template_matches_transformers(minimind):
    tok, _, oracle = minimind
    for (messages, gen), text, ids in zip(CHATS, oracle["chat_text"], oracle["chat_ids"]):
        assert tok.apply_chat_template(messages, add_generation_prompt=gen) == text
        got_ids, mask = tok.encode_chat(messages, add_generation_prompt=gen)
        assert got_ids == ids == tok.encode(text, False, False)
        assert len(mask) == len(ids)


def test_minimind_assistant_mask_is_contents_and_end_of_turn(minimind):
    tok = minimind[0]
    messages = CHATS[3][0]
    ids, mask = tok.encode_chat(messages, add_generation_prompt=False)
    trained = "".join(tok.decode_token(i) for i, m in zip(ids, mask) if m)
    assert trained == "hello<|im_end|>4, of course.\n<|im_end|>"
    ids, mask = tok.encode_chat(CHATS[4][0])
    trained = "".join(tok.decode_token(i) for i, m in zip(ids, mask) if m)
    assert trained == "steps\n</think>\n\nanswer<|im_end|>"  # minimind's template re-wraps the reasoning
    ids, mask = tok.encode_chat(CHATS[1][0], add_generation_prompt=True)
    assert sum(mask) == 0


CUSTOM_TEMPLATE = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'system' %}
[SYS] {{ m.content | trim }}
    {% else %}
        {% set ns.n = ns.n + 1 %}
<{{ m.role }} #{{ ns.n }}>{{ m.content }}{% if loop.last %} (last){% endif %}
    {% endif %}
    {% if m.content == 'STOP' %}{% break %}{% endif %}
{% endfor %}
{{ {"meta": "<a&b>", "zh": "中文", "n": [1, 2]} | tojson }}
{% if add_generation_prompt %}<assistant>{% endif %}"""


def test_jinja_environment_renders_like_transformers(tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(MINIMIND, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = CUSTOM_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    chats = CHATS[2:4] + [([{"role": "user", "content": "a"}, {"role": "user", "content": "STOP"},
                            {"role": "user", "content": "never"}], True)]
    oracle = hf_oracle(str(d), **chat_request(chats))
    tok = HFTokenizer(str(d))
    assert [tok.apply_chat_template(m, g) for m, g in chats] == oracle["chat_text"]
    assert "never" not in oracle["chat_text"][-1] and '"<a&b>"' in oracle["chat_text"][-1]


def test_chat_template_errors_are_one_line_user_errors():
    t = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}"
                     "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert t.render([{"role": "user", "content": "x"}]) == "x"
    with pytest.raises(UserError, match="first turn must be user"):
        t.render([{"role": "system", "content": "x"}])
    with pytest.raises(UserError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(UserError, match=r"messages\[1\]"):
        t.render([{"role": "user", "content": "x"}, {"role": "user"}])
    with pytest.raises(UserError, match="namespace"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([{"role": "user", "content": "x"}])


# ---- LLaMA-3 (tiktoken) chat format ----

def test_llama3_chat_format_is_metas(tokenizer):
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    ids, mask = tokenizer.encode_chat(messages, add_generation_prompt=False)
    sh, eh, eot = 128006, 128007, 128009
    enc = lambda s: tokenizer.encode(s, bos=False, eos=False)  # noqa: E731
    expect = [128000]
    for role, content in (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")):
        expect += [sh] + enc(role) + [eh] + enc("\n\n") + enc(content) + [eot]
    assert ids == expect
    assert enc("user") == [882] and enc("assistant") == [78191] and enc("\n\n") == [271]  # golden LLaMA-3 ids
    assert [i for i, m in zip(ids, mask) if m] == enc("Hello!") + [eot]
    ids2, mask2 = tokenizer.encode_chat(messages[:2], add_generation_prompt=True)
    assert ids2[-4:] == [sh, 78191, eh, 271] and sum(mask2) == 0
    text = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.encode("<|eot_id|>", False, False) != [eot]  # encode still treats special text as text


def test_load_tokenizer_picks_the_class(tmp_path):
    assert isinstance(load_tokenizer(MINIMIND), HFTokenizer)
    assert isinstance(load_tokenizer(os.path.join(MINIMIND, "tokenizer.json")), HFTokenizer)
    tik = Tokenizer().model_path
    assert isinstance(load_tokenizer(tik), Tokenizer)
    both = tmp_path / "both"
    shutil.copytree(MINIMIND, both)
    shutil.copyfile(tik, both / "tokenizer.model")
    assert isinstance(load_tokenizer(str(both)), Tokenizer)
    with pytest.raises(UserError, match="no tokenizer.model"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(str(tmp_path / "missing"))


def test_hf_tokenizer_bad_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a Hugging Face tokenizers file"):
        HFTokenizer(str(tmp_path))
    d = tmp_path / "tok"
    shutil.copytree(MINIMIND, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(dict(config, eos_token="<|no_such_token|>")))
    with pytest.raises(UserError, match="eos_token"):
        HFTokenizer(str(d))
    del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer(str(d))
    with pytest.raises(UserError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert HFTokenizer(str(d)).stop_tokens == {0, 2}
