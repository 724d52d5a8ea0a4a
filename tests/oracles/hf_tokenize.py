"""Oracle: what `transformers.AutoTokenizer` gives for a tokenizer directory (run in its own process).

stdin: {"dir": ..., "texts": [str], "ids": [[int]], "chats": [{"messages": [...], "add_generation_prompt": bool,
        "kwargs": {template variables, optional}}], "assistant_masks": bool}
stdout: {"encode": [[int]], "decode": [str], "chat_text": [str], "chat_ids": [[int]], "chat_masks": [[int]]}
"""
import json
import sys

from transformers import AutoTokenizer


def main():
    req = json.load(sys.stdin)
    tok = AutoTokenizer.from_pretrained(req["dir"])
    out = {"encode": [tok(s, add_special_tokens=False)["input_ids"] for s in req.get("texts", [])],
           "decode": [tok.decode(ids) for ids in req.get("ids", [])],
           "chat_text": [], "chat_ids": [], "chat_masks": []}
    for chat in req.get("chats", []):
        gen, kw = chat["add_generation_prompt"], chat.get("kwargs", {})
        out["chat_text"].append(tok.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=gen,
                                                        **kw))
        enc = tok.apply_chat_template(chat["messages"], add_generation_prompt=gen, return_dict=True,
                                      return_assistant_tokens_mask=req.get("assistant_masks", False), **kw)
        out["chat_ids"].append(list(enc["input_ids"]))
        if req.get("assistant_masks"):
            out["chat_masks"].append(list(enc["assistant_masks"]))
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
