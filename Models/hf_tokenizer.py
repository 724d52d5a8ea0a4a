"""Hugging Face `tokenizer.json` tokenizers behind the project's tokenizer interface.

The interface every tokenizer of the project offers (the LLaMA-3 tiktoken `Models.tokenizer.Tokenizer` too):

    encode(text, bos, eos) -> list[int]      decode(ids) -> str      decode_token(i) -> str
    bos_id, eos_id, pad_id (-1 when the tokenizer has none), stop_tokens (set of ids), n_words
    apply_chat_template(messages, add_generation_prompt=False, **template_kwargs) -> str
    encode_chat(messages, add_generation_prompt=False, **template_kwargs) -> (ids, assistant_mask)

`HFTokenizer(path)` reads `tokenizer.json` (the `tokenizers` library does the tokenisation) and, beside it,
`tokenizer_config.json` (bos/eos/pad/unk and the other named special tokens, `chat_template`, `model_max_length`,
`added_tokens_decoder`), `chat_template.jinja` (transformers 5 stores the template there; it wins over the config
field) and `generation_config.json` (its `eos_token_id`, int or list, joins `stop_tokens`). Token ids and strings
equal those of `transformers.AutoTokenizer` on the same directory: `encode(s, False, False)` ==
`tok(s, add_special_tokens=False).input_ids` (added tokens written in the text are matched, as transformers does),
`decode(ids)` == `tok.decode(ids)` (no special tokens skipped, no "clean-up" of spaces), and the chat template is
rendered by `Utils.chat_template` as transformers renders it. `bos`/`eos` in `encode` prepend/append bos_id/eos_id
explicitly (nothing when the tokenizer has none); the tokenizer's own post-processor is never applied, so a
tokenizer.json that adds BOS itself does not add it twice.
"""
import json
import os

from Utils.chat_template import ChatTemplate
from Utils.errors import UserError

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value):
    """A special-token entry of tokenizer_config.json: a string, or a serialised AddedToken {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path, required=False):
    if not os.path.isfile(path):
        if required:
            raise UserError("%s: file not found" % path)
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError("%s: not readable JSON (%s)" % (path, str(e).splitlines()[0]))
    if not isinstance(data, dict):
        raise UserError("%s: expected a JSON object" % path)
    return data


def _resolve_paths(path):
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise UserError("%s: tokenizer.json not found (expected a Hugging Face tokenizers file or its directory)"
                        % path)
    return path, os.path.dirname(os.path.abspath(path))


def _chat_template_source(directory, config, config_path):
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read(), jinja_path
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # named templates: [{"name": ..., "template": ...}], "default" is the chat one
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    if tpl is not None and not isinstance(tpl, str):
        raise UserError("%s: field 'chat_template' must be a string or a list of named templates" % config_path)
    return tpl, config_path + ":chat_template"


class HFTokenizer:
    """A `tokenizer.json` tokenizer (Hugging Face `tokenizers`) with its tokenizer_config.json."""

    def __init__(self, path):
        from tokenizers import AddedToken, Tokenizer as Backend

        self.path, self.dir = _resolve_paths(path)
        self.model_path = self.path
        try:
            self.backend = Backend.from_file(self.path)
        except Exception as e:  # tokenizers raises plain Exception subclasses for malformed files
            raise UserError("%s: not a Hugging Face tokenizers file (%s)" % (self.path, str(e).splitlines()[0]))
        config_path = os.path.join(self.dir, "tokenizer_config.json")
        self.config = _read_json(config_path)
        self._add_declared_tokens(self.config.get("added_tokens_decoder") or {}, config_path, AddedToken)

        # Named special tokens: the seven standard names plus any other "*_token" string field, as transformers
        # exposes them to chat templates (e.g. minimind's image_token).
        self.special_token_names = {}
        for key, value in self.config.items():
            text = _token_text(value)
            if text is not None and (key in NAMED_SPECIAL_TOKENS or key.endswith("_token")):
                self.special_token_names[key] = text
        extra = self.config.get("extra_special_tokens")
        if isinstance(extra, dict):  # transformers 5's named form {"image_token": "<img>", ...}
            self.special_token_names.update((k, _token_text(v)) for k, v in extra.items() if _token_text(v))
        self.bos_id = self._named_id("bos_token", config_path)
        self.eos_id = self._named_id("eos_token", config_path)
        self.pad_id = self._named_id("pad_token", config_path)
        self.unk_id = self._named_id("unk_token", config_path)

        added = self.backend.get_added_tokens_decoder()
        self.special_tokens = {tok.content: i for i, tok in sorted(added.items()) if tok.special}
        self.n_words = max([self.backend.get_vocab_size(with_added_tokens=True)] + [i + 1 for i in added])
        self.model_max_length = self.config.get("model_max_length")

        self.stop_tokens = {self.eos_id} if self.eos_id >= 0 else set()
        gen_path = os.path.join(self.dir, "generation_config.json")
        gen_eos = _read_json(gen_path).get("eos_token_id")
        for i in (gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []):
            if not isinstance(i, int) or not 0 <= i < self.n_words:
                raise UserError("%s: eos_token_id %r is not a token id of %s" % (gen_path, i, self.path))
            self.stop_tokens.add(i)

        source, where = _chat_template_source(self.dir, self.config, config_path)
        self.chat_template = ChatTemplate(source, self.special_token_names, where) if source else None

    def _add_declared_tokens(self, declared, config_path, AddedToken):
        # transformers adds the tokens of `added_tokens_decoder` that tokenizer.json lacks; do the same, and make sure
        # every declared token ends up at its declared id.
        if not isinstance(declared, dict):
            raise UserError("%s: field 'added_tokens_decoder' must be an object {id: token}" % config_path)
        for key in sorted(declared, key=lambda k: int(k) if str(k).isdigit() else -1):
            entry = declared[key]
            text = _token_text(entry)
            if not str(key).isdigit() or text is None:
                raise UserError("%s: added_tokens_decoder[%r] must map an integer id to {\"content\": ...}"
                                % (config_path, key))
            if self.backend.token_to_id(text) is None:
                flags = {k: bool(entry.get(k, False)) for k in ("lstrip", "rstrip", "single_word")}
                tok = AddedToken(text, normalized=bool(entry.get("normalized", False)),
                                 special=bool(entry.get("special", False)), **flags)
                (self.backend.add_special_tokens if tok.special else self.backend.add_tokens)([tok])
            if self.backend.token_to_id(text) != int(key):
                raise UserError("%s: added_tokens_decoder says %r has id %s but tokenizer.json gives it %s"
                                % (config_path, text, key, self.backend.token_to_id(text)))

    def _named_id(self, name, config_path):
        text = self.special_token_names.get(name)
        if text is None:
            return -1
        i = self.backend.token_to_id(text)
        if i is None:
            raise UserError("%s: %s %r is not a token of %s" % (config_path, name, text, self.path))
        return i

    # ---- the project's tokenizer interface ----

    def encode(self, s, bos, eos):
        """Token ids of `s` (added tokens in the text are matched), with bos_id/eos_id around it if asked for."""
        assert isinstance(s, str)
        t = self.backend.encode(s, add_special_tokens=False).ids
        if bos and self.bos_id >= 0:
            t.insert(0, self.bos_id)
        if eos and self.eos_id >= 0:
            t.append(self.eos_id)
        return t

    def decode(self, t):
        return self.backend.decode([int(i) for i in t], skip_special_tokens=False)

    def decode_token(self, i):
        """The text of one token; a piece of a multi-byte character shows as U+FFFD."""
        return self.backend.decode([int(i)], skip_special_tokens=False)

    def _template(self):
        if self.chat_template is None:
            raise UserError("%s: this tokenizer has no chat template (no 'chat_template' in tokenizer_config.json "
                            "and no chat_template.jinja)" % self.path)
        return self.chat_template

    def apply_chat_template(self, messages, add_generation_prompt=False, **template_kwargs):
        """The chat as one string, as transformers' `apply_chat_template(messages, tokenize=False, **kwargs)` renders
        it: extra keyword arguments are template variables (`enable_thinking=False` for Qwen3's template)."""
        return self._template().render(messages, add_generation_prompt, **template_kwargs)

    def encode_chat(self, messages, add_generation_prompt=False, **template_kwargs):
        """(ids, assistant_mask): ids == encode(apply_chat_template(...), False, False); mask 1 on assistant tokens.

        The mask covers each assistant turn's text and its end-of-turn token. With `{% generation %}` blocks in the
        template it is exactly the marked text; otherwise the turn runs from the end of the generation prompt to
        the last stop token of the turn (the separator the template writes after that token is not trained).
        A token that straddles a span boundary counts as inside.
        """
        template = self._template()
        text, spans = template.render_with_assistant_spans(messages, add_generation_prompt, **template_kwargs)
        enc = self.backend.encode(text, add_special_tokens=False)
        ids, offsets = list(enc.ids), enc.offsets
        mask = [0] * len(ids)
        for start, end in spans:
            inside = [k for k, (a, b) in enumerate(offsets) if a < end and b > start]
            if not template.has_generation_blocks:
                stops = [k for k in inside if ids[k] in self.stop_tokens]
                if stops:
                    inside = [k for k in inside if k <= stops[-1]]
            for k in inside:
                mask[k] = 1
        return ids, mask
