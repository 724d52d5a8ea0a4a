"""Chat templates with template variables (issue 19): a Qwen3-style template (tests/chat_fixtures.py) renders and
tokenises as transformers does with and without `enable_thinking` (transformers runs in its own process); the
`--prompt_template chat` path of Math.py and inference.py frames a record as one user turn and supervises exactly the
assistant's answer and its <|im_end|>."""
import json

import pytest

from chat_fixtures import write_qwen3_style_tokenizer
from Dataset.encoding import IGNORE_INDEX, encode_example_info
from Dataset.prompts import ChatPrompt, format_prompt, parse_template_kwargs, prompt_ids
from Models.hf_tokenizer import HFTokenizer
from Utils.errors import UserError
from test_tokenizers import chat_request, hf_oracle

SYSTEM = {"role": "system", "content": "Answer with one number."}
CHATS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [SYSTEM, {"role": "user", "content": "2+2?"}],
    [SYSTEM, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
     {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nsteps\n</think>\n\nanswer"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "\nr\n"},
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b", "reasoning_content": "r2"}],
]
VARIANTS = [{}, {"enable_thinking": True}, {"enable_thinking": False}]
RECORD = {"instruction": "What is 12 plus 30?", "input": "", "output": "12 + 30 = 42. The answer is 42.",
          "answer": "42"}


@pytest.fixture(scope="module")
def qwen3_style(tmp_path_factory):
    d = write_qwen3_style_tokenizer(str(tmp_path_factory.mktemp("tok") / "q3"))
    chats = [(m, gen, kw) for m in CHATS for gen in (False, True) for kw in VARIANTS]
    request = chat_request([(m, gen) for m, gen, _ in chats])
    for entry, (_, _, kw) in zip(request["chats"], chats):
        entry["kwargs"] = kw
    return HFTokenizer(d), chats, hf_oracle(d, **request)


def test_template_variables_render_and_tokenise_like_transformers(qwen3_style):
    tok, chats, oracle = qwen3_style
    for (messages, gen, kw), text, ids in zip(chats, oracle["chat_text"], oracle["chat_ids"]):
        assert tok.apply_chat_template(messages, gen, **kw) == text, (messages, gen, kw)
        assert tok.encode(text, False, False) == ids
        if messages in (CHATS[3], CHATS[5]):
            # Like Qwen3's, the template drops the think block of an assistant turn once a user turn follows, so
            # a shorter chat is not a prefix of the longer one and the assistant turns cannot be located by prefixes.
            with pytest.raises(UserError, match="not a prefix of the whole chat"):
                tok.encode_chat(messages, gen, **kw)
        else:
            assert tok.encode_chat(messages, gen, **kw)[0] == ids
    # the variable matters: only enable_thinking=False opens the answer with an empty think block
    texts = {json.dumps(kw): tok.apply_chat_template(CHATS[0], True, **kw) for kw in VARIANTS}
    assert texts['{"enable_thinking": false}'].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert texts["{}"] == texts['{"enable_thinking": true}'] and texts["{}"].endswith("<|im_start|>assistant\n")


def test_reasoning_shows_only_after_the_last_user_turn(qwen3_style):
    tok = qwen3_style[0]
    text = tok.apply_chat_template(CHATS[5])
    assert "r2" in text and "\nr\n" not in text and text.count("<think>") == 1
    assert tok.apply_chat_template(CHATS[4]).endswith("<think>\nsteps\n</think>\n\nanswer<|im_end|>\n")
    with pytest.raises(UserError, match="system turn may only open"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, SYSTEM])


def test_template_variable_errors_are_one_line(qwen3_style):
    from Models.tokenizer import Tokenizer
    tok = qwen3_style[0]
    with pytest.raises(UserError, match="'messages' is not a template variable"):
        parse_template_kwargs('{"messages": []}')
    with pytest.raises(UserError, match="takes no template variables"):
        Tokenizer().encode_chat(CHATS[0], True, enable_thinking=False)
    assert parse_template_kwargs('{"enable_thinking": false}') == {"enable_thinking": False}
    assert parse_template_kwargs("") == {}
    for bad, pattern in (("[1]", "expected a JSON object"), ("{enable", "not valid JSON")):
        with pytest.raises(UserError, match=pattern):
            parse_template_kwargs(bad)


@pytest.mark.parametrize("kw", VARIANTS, ids=["default", "thinking", "no-thinking"])
def test_training_supervises_the_answer_and_end_of_turn_only(qwen3_style, kw):
    tok = qwen3_style[0]
    chat = ChatPrompt(kw)
    enc = encode_example_info(RECORD, tok, 512, chat)
    assert enc.n_dropped == 0 and len(enc.input_ids) == len(enc.labels)
    full = tok.apply_chat_template(ChatPrompt.messages(RECORD), **kw)
    assert enc.input_ids == tok.encode(full, False, False)      # no BOS: this tokenizer has none, as Qwen3's
    supervised = tok.decode([t for t in enc.labels if t != IGNORE_INDEX])
    think = "" if kw.get("enable_thinking") is False else "<think>\n\n</think>\n\n"
    assert supervised == think + RECORD["output"] + "<|im_end|>"
    assert all(t == IGNORE_INDEX for t in enc.labels[:enc.n_prompt]) and enc.labels[enc.n_prompt] != IGNORE_INDEX
    # inference's prompt is the training text up to the first supervised token
    prompt = prompt_ids(RECORD, tok, 512, 30, chat)
    assert prompt == enc.input_ids[:enc.n_prompt]
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if not think else ""))


def test_chat_truncation_and_inputs(qwen3_style):
    tok = qwen3_style[0]
    chat = ChatPrompt({"enable_thinking": False})
    rec = dict(RECORD, input="numbers: " + " ".join(str(i) for i in range(200)))
    user = ChatPrompt.messages(rec, with_answer=False)[0]["content"]
    assert user == RECORD["instruction"] + "\n\n" + rec["input"]
    full = encode_example_info(rec, tok, 4096, chat)
    cut = encode_example_info(rec, tok, 40, chat)
    assert cut.input_ids == full.input_ids[:40] and cut.n_dropped == len(full.input_ids) - 40
    assert all(t == IGNORE_INDEX for t in cut.labels)             # the answer did not fit: no loss from it
    shortened = prompt_ids(rec, tok, 120, 30, chat)               # the input gives way, the turn structure stays
    assert len(shortened) <= 90 + 2 and tok.decode(shortened).endswith("<think>\n\n</think>\n\n")
    assert RECORD["instruction"] in tok.decode(shortened)
    # alpaca stays the default and the reference's text (no BOS to prepend here)
    assert tok.decode(prompt_ids(RECORD, tok, 512, 30)) == format_prompt(RECORD)
