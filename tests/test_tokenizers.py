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


CUSTOM_TEMPLATE = """{{ bos_token }}{{ image_token }}{{ think_token }}{% set ns = namespace(n=0) %}
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
    config["extra_special_tokens"] = {"think_token": "<think>"}  # named extra tokens reach the template too
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    chats = CHATS[2:4] + [([{"role": "user", "content": "a"}, {"role": "user", "content": "STOP"},
                            {"role": "user", "content": "never"}], True)]
    oracle = hf_oracle(str(d), **chat_request(chats))
    tok = HFTokenizer(str(d))
    assert [tok.apply_chat_template(m, g) for m, g in chats] == oracle["chat_text"]
    assert "never" not in oracle["chat_text"][-1] and '"<a&b>"' in oracle["chat_text"][-1]
    assert oracle["chat_text"][0].startswith("<|im_start|><|image_pad|><think>[SYS] You are terse.\n")


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


# ---- tokenizer training (Utils.train_tokenizer) ----

EN = ["the model reads tokens and predicts the next one", "experts share the work, a router picks two of them",
      "training loss goes down; validation loss follows (mostly)", "Python's standard library has many modules!"]
ZH = ["今天天气很好，我们去公园散步吧。", "机器学习模型需要大量的数据来训练。", "专家混合模型把每个词交给两个专家。", "你好，世界！"]
EMOJI = ["🍕", "☕", "👍", "🎉", "😀", "🚀"]
HELD_OUT = ["Completely unseen words: zygote, quixotic, fjord.", "龘靐齉 are rare characters; 𠀀 is outside the BMP.",
            "emoji never seen: 🧪🦄 and a family 👨‍👩‍👧 and a flag 🇯🇵", "digits 9876543210 and 007, 3.5e-7",
            "  spaces   tabs\t\tnewlines\n\nCRLF\r\nend ", "full-width １２３ ＡＢＣ and ligature ﬁ, Å vs Å",
            "混合 mixed 文本 with 标点：「引号」、《书名》…", "<|im_end|> and <|sep|> as text", ""]


def write_corpus(path, n=400, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            parts = [rng.choice(EN), rng.choice(ZH), rng.choice(EMOJI) * rng.randint(1, 3),
                     str(rng.randint(0, 10 ** rng.randint(1, 8))), rng.choice(EN).upper()]
            rng.shuffle(parts)
            f.write(json.dumps({"text": " ".join(parts) + rng.choice([".", "!", "?", "..."])},
                               ensure_ascii=False) + "\n")


def run_train(*args):
    return subprocess.run([sys.executable, "-m", "Utils.train_tokenizer"] + [str(a) for a in args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    write_corpus(d / "corpus.jsonl")
    out = {}
    for recipe, vocab in (("bytelevel", 700), ("seq2seq", 512)):
        r = run_train("--data", d / "corpus.jsonl", "--vocab_size", vocab, "--out_dir", d / recipe,
                      "--recipe", recipe)
        assert r.returncode == 0, r.stderr
        assert "trained %s tokenizer" % recipe in r.stdout
        out[recipe] = (str(d / recipe), vocab)
    return out


def expected_round_trip(recipe, s):
    return s if recipe == "bytelevel" else unicodedata.normalize("NFKC", s)


@pytest.mark.parametrize("recipe", ["bytelevel", "seq2seq"])
def test_trained_round_trip_exact(trained, recipe):
    tok = HFTokenizer(trained[recipe][0])
    for s in HELD_OUT + TEXTS:
        assert tok.decode(tok.encode(s, False, False)) == expected_round_trip(recipe, s), s
    assert "[UNK]" not in tok.decode(tok.encode("龘🦄𠀀", False, False))


@pytest.mark.parametrize("recipe", ["bytelevel", "seq2seq"])
def test_trained_specials_ids_and_vocab_size(trained, recipe):
    from Utils.train_tokenizer import BYTELEVEL_SPECIALS, SEQ2SEQ_SPECIALS
    directory, vocab = trained[recipe]
    tok = HFTokenizer(directory)
    specials = BYTELEVEL_SPECIALS if recipe == "bytelevel" else SEQ2SEQ_SPECIALS
    for i, s in enumerate(specials):
        assert tok.encode(s, False, False) == [i] and tok.decode([i]) == s
        assert tok.encode("x%sy" % s, False, False)[1:-1] == [i]
    assert tok.n_words <= (vocab if recipe == "bytelevel" else vocab - len(SEQ2SEQ_SPECIALS))
    assert tok.n_words > 300  # merges were learned beyond the 256 byte symbols
    if recipe == "bytelevel":
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_tokens) == (1, 2, 0, {2})
    else:
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 3, 0, 1)
    with open(os.path.join(directory, "tokenizer_config.json")) as f:
        assert json.load(f)["model_max_length"] == 32768


def test_seq2seq_splits_digits_and_punctuation(trained):
    tok = HFTokenizer(trained["seq2seq"][0])
    for number in ("2024", "9876543210", "000"):
        ids = tok.encode(number, False, False)
        assert [tok.decode_token(i) for i in ids] == list(number)
    pieces = [tok.decode_token(i) for i in tok.encode("loss, router!", False, False)]
    assert "," in pieces and "!" in pieces


@pytest.mark.parametrize("recipe", ["bytelevel", "seq2seq"])
def test_trained_save_load_identical_ids(trained, recipe):
    from tokenizers import Tokenizer as Backend
    directory = trained[recipe][0]
    tok = HFTokenizer(directory)
    raw = Backend.from_file(os.path.join(directory, "tokenizer.json"))
    ours = [tok.encode(s, False, False) for s in HELD_OUT]
    assert ours == [raw.encode(s, add_special_tokens=False).ids for s in HELD_OUT]
    chats = CHATS[2:4] if recipe == "bytelevel" else []
    oracle = hf_oracle(directory, texts=HELD_OUT, ids=ours, **chat_request(chats, masks=True))
    assert ours == oracle["encode"]
    assert [tok.decode(t) for t in ours] == oracle["decode"]
    for (messages, gen), text, ids, mask in zip(chats, oracle["chat_text"], oracle["chat_ids"], oracle["chat_masks"]):
        assert tok.apply_chat_template(messages, gen) == text
        assert tok.encode_chat(messages, gen) == (ids, mask)  # the {% generation %} spans transformers marks
        assert sum(mask) > 0


def test_bytelevel_chat_template_marks_contents_and_im_end(trained):
    tok = HFTokenizer(trained["bytelevel"][0])
    ids, mask = tok.encode_chat(CHATS[3][0], add_generation_prompt=True)
    assert "".join(tok.decode_token(i) for i, m in zip(ids, mask) if m) == "hello<|im_end|>4, of course.\n<|im_end|>"
    assert tok.apply_chat_template(CHATS[0][0], True) == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(UserError, match="unsupported chat role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_train_input_formats(tmp_path):
    (tmp_path / "qa.json").write_text(json.dumps([{"question": "一加一等于几？", "answer": "二"}] * 20,
                                                 ensure_ascii=False))
    conv = {"conversations": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi!"}]}
    (tmp_path / "sft.jsonl").write_text((json.dumps(conv) + "\n") * 20)
    (tmp_path / "wyf3.jsonl").write_text(json.dumps({"instruction": "add", "input": "1 2", "output": "3",
                                                     "history": [["q", "a"]]}) + "\n")
    (tmp_path / "plain.txt").write_text("first paragraph\nstill first\n\nsecond paragraph 🚀\n")
    (tmp_path / "body.jsonl").write_text(json.dumps({"body": "text under another field"}) + "\n")
    r = run_train("--data", tmp_path / "qa.json", tmp_path / "sft.jsonl", tmp_path / "wyf3.jsonl",
                  tmp_path / "plain.txt", "--vocab_size", 300, "--out_dir", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    assert "from 87 texts" in r.stdout  # 20*2 + 20*2 + 4 + 2 + 1 non-empty texts
    r = run_train("--data", tmp_path / "body.jsonl", "--text_field", "body", "--vocab_size", 300,
                  "--out_dir", tmp_path / "tok2", "--chat_template", "none", "--special_tokens", "<tool>")
    assert r.returncode == 0, r.stderr
    tok = HFTokenizer(str(tmp_path / "tok2"))
    assert tok.chat_template is None and tok.encode("<tool>", False, False) == [3]
    assert oct(os.stat(tmp_path / "tok2").st_mode & 0o777) != oct(0o700)


BAD_INPUTS = [
    ("empty_line.jsonl", '{"text": "a"}\n\n{"text": "b"}\n', [], "empty_line.jsonl line 2: empty line"),
    ("bad_json.jsonl", '{"text": "a"}\n{"text": \n', [], "bad_json.jsonl line 2: not valid JSON"),
    ("no_field.jsonl", '{"text": "a"}\n{"txt": "b"}\n', [], "no_field.jsonl line 2: expected a record with a string "
                                                           "field 'text'"),
    ("empty_text.jsonl", '{"text": "   "}\n', [], "empty_text.jsonl line 1: the record's text is empty"),
    ("not_list.json", '{"question": "q"}', [], "not_list.json: expected a JSON list"),
    ("ok.jsonl", '{"text": "a"}\n', ["--vocab_size", "100"], "--vocab_size 100: the bytelevel recipe needs at least"),
    ("ok.jsonl", '{"text": "a"}\n', ["--recipe", "seq2seq", "--vocab_size", "270"], "--vocab_size 270: the seq2seq"),
    ("ok.jsonl", '{"text": "a"}\n', ["--chat_template", "missing.jinja"], "--chat_template missing.jinja: file not"),
    ("ok.jsonl", '{"text": "a"}\n', ["--special_tokens", "<|im_end|>"], "--special_tokens"),
]


@pytest.mark.parametrize("name,content,flags,message", BAD_INPUTS)
def test_train_bad_input_is_one_line_and_keeps_out_dir(tmp_path, name, content, flags, message):
    (tmp_path / name).write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("previous")
    args = ["--data", tmp_path / name, "--vocab_size", 300, "--out_dir", out] + flags
    r = run_train(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert sorted(os.listdir(out)) == ["tokenizer.json"] and (out / "tokenizer.json").read_text() == "previous"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".train_tokenizer-")]


def test_train_bad_template_file(tmp_path):
    write_corpus(tmp_path / "c.jsonl", n=5)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.content }")
    r = run_train("--data", tmp_path / "c.jsonl", "--vocab_size", 300, "--out_dir", tmp_path / "o",
                  "--chat_template", tmp_path / "t.jinja")
    assert r.returncode == 2 and "does not compile" in r.stderr and not (tmp_path / "o").exists()
