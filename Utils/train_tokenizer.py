"""Tokenizer training: BPE tokenizers trained with Hugging Face `tokenizers`, saved as standard tokenizer files.

    python -m Utils.train_tokenizer --data corpus.jsonl --vocab_size 6400 --out_dir tok/ [--recipe bytelevel|seq2seq]
        [--text_field text] [--special_tokens T ...] [--chat_template FILE|none] [--model_max_length N]

Output: `tokenizer.json` and `tokenizer_config.json` (bos/eos/pad/unk tokens, the special tokens, `chat_template`,
`model_max_length`), which `tokenizers.Tokenizer.from_file`, `transformers.AutoTokenizer.from_pretrained(out_dir)`
and `Models.hf_tokenizer.HFTokenizer(out_dir)` all load. Both files are written to a temporary directory beside
`out_dir` and moved into place only when training succeeded, so a failed run leaves nothing half-written and
other files already in `out_dir` are kept.

Recipes:
* `bytelevel` (minimind-style LM tokenizer): no normaliser; ByteLevel pre-tokenizer (GPT-2 regex split, no prefix
  space) and ByteLevel decoder; BPE whose alphabet is the 256 byte symbols, so any text encodes without an unknown
  token and decode(encode(s)) == s exactly. Specials `<|endoftext|>` 0 (pad), `<|im_start|>` 1 (bos),
  `<|im_end|>` 2 (eos, end of turn), then `--special_tokens`. Chat template: ChatML (`<|im_start|>role\\n` content
  `<|im_end|>\\n`), with each assistant content and its `<|im_end|>` inside `{% generation %}` so transformers'
  `return_assistant_tokens_mask` and our `encode_chat` mark exactly what SFT trains on.
* `seq2seq` (the encoder-decoder tokenizer): NFKC normaliser; pre-tokenisation Punctuation (each punctuation mark
  alone) then Digits (each digit alone); BPE with byte_fallback and `[UNK]`; the 11 specials `[PAD]` `[UNK]`
  `<|bos|>` `<|eos|>` `<|sep|>` `[gMASK]` `[MASK]` `<sog>` `<eog>` `<|user|>` `<|system|>` at ids 0-10; the
  trainer is given vocab_size - 11 ids, so the vocabulary has at most vocab_size - 11 entries (tokenizers already
  counts specials in its budget; this keeps the ids the encoder-decoder recipe has always produced for a size).
  Round trip: decoding with a ByteLevel decoder only inverts a ByteLevel *pre-tokenizer*, which maps each byte of
  the text to one of 256 printable symbols; pairing it with plain Punctuation/Digits splitting (as the recipe
  originally did) makes the decoder reinterpret ordinary characters as byte symbols and garbles CJK and emoji. We
  use ByteLevel on both sides: after the Punctuation and Digits splits, a ByteLevel step that only maps bytes to
  symbols (`use_regex=False`, so it adds no GPT-2 word splitting and words keep their spaces as in the original
  recipe), and the 256 symbols as the initial alphabet. Every byte then has a token, byte fallback never fires,
  and decode(encode(s)) == NFKC(s) exactly. (The alternative, byte-fallback `<0xNN>` tokens with a ByteFallback +
  Fuse decoder, spends 256 ids on byte tokens plus every character seen in training, more than a 512-token
  vocabulary holds with CJK text.) No chat template unless `--chat_template` is given.

Input (`--data`, one or more files): `.txt` is plain text, one training text per paragraph (blank-line separated);
`.json` is a JSON list of records; anything else is JSON lines, one record per line. A record gives its text
field (`--text_field`, default "text"), or every string of `{"question", "answer"}`, `{"conversations": [{"role",
"content"}, ...]}` or `{"instruction", "input", "output", "history"}`. An empty line, invalid JSON or a record
without text is a one-line error naming the file and line.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from Utils.chat_template import ChatTemplate
from Utils.errors import UserError, cli_main

BYTELEVEL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SEQ2SEQ_SPECIALS = ("[PAD]", "[UNK]", "<|bos|>", "<|eos|>", "<|sep|>", "[gMASK]", "[MASK]", "<sog>", "<eog>",
                    "<|user|>", "<|system|>")
RECIPE_TOKENS = {  # tokenizer_config.json's named special tokens per recipe
    "bytelevel": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "seq2seq": {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "[PAD]", "unk_token": "[UNK]",
                "sep_token": "<|sep|>", "mask_token": "[MASK]"},
}
N_BYTES = 256

CHATML_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "{{- raise_exception('unsupported chat role ' + message['role'] + ' (expected system, user or assistant)') }}\n"
    "{%- elif message['role'] == 'assistant' %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}\n"
    "{{- '\\n' }}\n"
    "{%- else %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}"
)


# ---- reading the corpus ----

def _record_texts(rec, text_field):
    """The training texts of one record, or None when it has none of the known shapes."""
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get(text_field), str):
        return [rec[text_field]]
    if isinstance(rec.get("conversations"), list):
        turns = rec["conversations"]
        if all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in turns):
            return [t["content"] for t in turns]
        return None
    if isinstance(rec.get("question"), str) and isinstance(rec.get("answer"), str):
        return [rec["question"], rec["answer"]]
    if isinstance(rec.get("instruction"), str) and isinstance(rec.get("output"), str):
        texts = [rec["instruction"], rec.get("input") or "", rec["output"]]
        for pair in rec.get("history") or []:
            texts += [p for p in pair if isinstance(p, str)] if isinstance(pair, (list, tuple)) else []
        return texts
    return None


def _texts_of_file(path, text_field):
    """Yield (where, text) for every training text of `path`; raise a one-line UserError on bad input."""
    if not os.path.isfile(path):
        raise UserError("%s: --data file not found" % path)
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            if path.endswith(".txt"):
                for k, para in enumerate(f.read().split("\n\n"), 1):
                    if para.strip():
                        yield "%s paragraph %d" % (path, k), para
                return
            if path.endswith(".json"):
                try:
                    records = json.load(f)
                except json.JSONDecodeError as e:
                    raise UserError("%s: not valid JSON (%s)" % (path, e))
                if not isinstance(records, list):
                    raise UserError("%s: expected a JSON list of records" % path)
                numbered = (("%s item %d" % (path, k), r) for k, r in enumerate(records))
            else:
                numbered = _jsonl_records(f, path)
            for where, rec in numbered:
                texts = _record_texts(rec, text_field)
                if texts is None:
                    raise UserError("%s: expected a record with a string field '%s' (or question/answer, "
                                    "conversations, instruction/output)" % (where, text_field))
                texts = [t for t in texts if t.strip()]
                if not texts:
                    raise UserError("%s: the record's text is empty" % where)
                for t in texts:
                    yield where, t
        except UnicodeDecodeError as e:
            raise UserError("%s: not UTF-8 text (byte %d)" % (path, e.start))


def _jsonl_records(f, path):
    for lineno, line in enumerate(f, 1):
        where = "%s line %d" % (path, lineno)
        if not line.strip():
            raise UserError("%s: empty line (expected one JSON record per line)" % where)
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError("%s: not valid JSON (%s)" % (where, e.msg))


def scan_corpus(paths, text_field):
    """Validate every input file once, before anything is trained: (number of texts, number of characters)."""
    from tqdm import tqdm
    n, chars = 0, 0
    for path in paths:
        for _, text in tqdm(_texts_of_file(path, text_field), desc="reading %s" % os.path.basename(path),
                            unit=" texts", disable=None, file=sys.stderr):
            n += 1
            chars += len(text)
    if n == 0:
        raise UserError("%s: no training text in --data" % ", ".join(paths))
    return n, chars


# ---- the recipes ----

def build_recipe(recipe, vocab_size, special_tokens, min_frequency):
    """(untrained Tokenizer, BpeTrainer, all special tokens in id order) for a recipe name."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if recipe == "bytelevel":
        specials = list(BYTELEVEL_SPECIALS) + list(special_tokens)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        budget = vocab_size
    elif recipe == "seq2seq":
        specials = list(SEQ2SEQ_SPECIALS) + list(special_tokens)
        tok = Tokenizer(models.BPE(unk_token="[UNK]", byte_fallback=True))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        budget = vocab_size - len(SEQ2SEQ_SPECIALS)
    else:
        raise UserError("--recipe %r: expected bytelevel or seq2seq" % recipe)
    if len(set(specials)) != len(specials):
        raise UserError("--special_tokens: %s repeats a special token of the %s recipe" % (special_tokens, recipe))
    smallest = N_BYTES + len(specials) + (vocab_size - budget)
    if vocab_size < smallest:
        raise UserError("--vocab_size %d: the %s recipe needs at least %d (256 byte symbols + %d special tokens)"
                        % (vocab_size, recipe, smallest, len(specials)))
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=budget, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=alphabet,
                                  show_progress=sys.stdout.isatty())  # its bars print blank lines into logs
    return tok, trainer, specials


def tokenizer_config(recipe, tok, specials, chat_template, model_max_length):
    """The tokenizer_config.json transformers reads (named special tokens, added tokens, template, max length)."""
    named = dict(RECIPE_TOKENS[recipe])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
              "add_prefix_space": False, "clean_up_tokenization_spaces": False,
              "model_max_length": model_max_length}
    config.update(named)
    config["additional_special_tokens"] = [s for s in specials if s not in named.values()]
    config["added_tokens_decoder"] = {
        str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True} for s in specials}
    if chat_template:
        config["chat_template"] = chat_template
    return config


def _read_chat_template(value):
    """--chat_template: None (the recipe's default), 'none' -> "" (no template), or the text of a template file."""
    if value is None or value.lower() == "none":
        return None if value is None else ""
    if not os.path.isfile(value):
        raise UserError("--chat_template %s: file not found (give a Jinja template file, or 'none')" % value)
    with open(value, encoding="utf-8") as f:
        return f.read()


def _install(tmp, out_dir):
    """Move the finished files from `tmp` into `out_dir` (a rename when out_dir does not exist yet)."""
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    for name in sorted(os.listdir(tmp)):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def train_tokenizer(data, vocab_size, out_dir, recipe="bytelevel", text_field="text", special_tokens=(),
                    chat_template=None, model_max_length=32768, min_frequency=2):
    """Train, save to `out_dir`, and return a summary dict.

    `chat_template`: the template text; None = the recipe's default (ChatML for bytelevel, none for seq2seq);
    "" = no template."""
    data = [data] if isinstance(data, str) else list(data)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError("--out_dir %s: exists and is not a directory" % out_dir)
    if os.path.isfile(os.path.join(out_dir, "chat_template.jinja")):
        raise UserError("--out_dir %s: holds a chat_template.jinja, which would override the new tokenizer's chat "
                        "template; remove it or choose another directory" % out_dir)
    if chat_template is None and recipe == "bytelevel":
        chat_template = CHATML_TEMPLATE
    tok, trainer, specials = build_recipe(recipe, vocab_size, special_tokens, min_frequency)
    if chat_template:
        ChatTemplate(chat_template, RECIPE_TOKENS[recipe], "--chat_template")  # fails now if it does not compile
    n_texts, n_chars = scan_corpus(data, text_field)

    start = time.time()
    texts = (t for path in data for _, t in _texts_of_file(path, text_field))
    tok.train_from_iterator(texts, trainer=trainer, length=n_texts)
    for s in specials:  # specials come first, in order: the ids the recipe promises
        assert tok.token_to_id(s) == specials.index(s), s

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".train_tokenizer-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; out_dir should get the usual permissions
        tok.save(os.path.join(tmp, "tokenizer.json"))
        config = tokenizer_config(recipe, tok, specials, chat_template, model_max_length)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
            f.write("\n")
        _install(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return {"recipe": recipe, "vocab_size": tok.get_vocab_size(with_added_tokens=True), "texts": n_texts,
            "chars": n_chars, "seconds": round(time.time() - start, 1), "out_dir": out_dir}


def build_parser():
    p = argparse.ArgumentParser(prog="python -m Utils.train_tokenizer", description=__doc__.split("\n\n")[0],
                                epilog="Recipes, input formats and outputs: see the module docstring "
                                       "(python -c 'import Utils.train_tokenizer as m; help(m)').")
    p.add_argument("--data", nargs="+", required=True, help="corpus files: .jsonl, .json (list) or .txt")
    p.add_argument("--vocab_size", type=int, required=True, help="largest vocabulary size, special tokens included "
                                                                    "(seq2seq: at most vocab_size - 11, see above)")
    p.add_argument("--out_dir", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    p.add_argument("--recipe", default="bytelevel", choices=["bytelevel", "seq2seq"])
    p.add_argument("--text_field", default="text", help="the text field of the jsonl records")
    p.add_argument("--special_tokens", nargs="*", default=[], help="extra special tokens after the recipe's own")
    p.add_argument("--chat_template", default=None,
                   help="Jinja chat template file, or 'none' (default: ChatML for bytelevel, none for seq2seq)")
    p.add_argument("--model_max_length", type=int, default=32768)
    p.add_argument("--min_frequency", type=int, default=2, help="a pair must occur this often to be merged")
    return p


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    template = _read_chat_template(args.chat_template)
    summary = train_tokenizer(args.data, args.vocab_size, args.out_dir, args.recipe, args.text_field,
                              args.special_tokens, template, args.model_max_length, args.min_frequency)
    print("trained %(recipe)s tokenizer: %(vocab_size)d ids from %(texts)d texts (%(chars)d characters) in "
          "%(seconds)ss -> %(out_dir)s" % summary)


if __name__ == "__main__":
    main()
