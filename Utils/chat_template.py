"""Chat templates: Jinja chat templates rendered exactly as `transformers` renders them, and assistant spans.

`transformers` (`utils/chat_template_utils.py`, 5.x) renders a tokenizer's `chat_template` in an immutable sandboxed
Jinja environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `{% generation %}` block
tag, a `tojson` filter that does not HTML-escape, and the globals `raise_exception`, `strftime_now`, `dict` and
`namespace`. The template sees `messages`, `tools`, `documents`, `add_generation_prompt` and the tokenizer's named
special tokens (`bos_token`, `eos_token`, ...), and any extra keyword argument of `apply_chat_template` as a variable
of its own (Qwen3's `enable_thinking`; these win over the special tokens, as there). Messages are copied first: keys
whose value is None are dropped and a reasoning text given as `thinking` / `reasoning` / `reasoning_content` is
visible under `thinking` and `reasoning_content`. This module reproduces that environment with its own code, so a
tokenizer.json tokenizer renders the same string without importing transformers.

Assistant spans (what supervised fine-tuning trains on): when the template marks them with `{% generation %}`, the
marked character ranges, as transformers' `return_assistant_tokens_mask` uses them. Otherwise each assistant turn's
range is found by rendering prefixes of the conversation: turn i spans from where the rendering of messages[:i]
with the generation prompt stops agreeing with the rendering of messages[:i+1], to the end of the latter. This needs
a template whose rendering of a prefix is a prefix of the full rendering (true of ChatML and LLaMA-3 style
templates, and of Qwen3's for chats that end with their only assistant turns); templates that rewrite earlier turns
— Qwen3's drops an assistant turn's think block once a user turn follows — are reported as errors.
"""
import json
import re
from datetime import datetime

from Utils.errors import UserError

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def check_messages(messages, where="messages"):
    """Validate a conversation: a non-empty list of dicts with string `role` and `content` (one-line UserError)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError("%s: expected a non-empty list of {\"role\", \"content\"} messages" % where)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError("%s[%d]: expected a dict with string 'role' and 'content', got %.80r" % (where, i, m))


def _plain(value):
    # The template only ever sees plain JSON-like data (a fresh copy, so the caller's messages are never edited).
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for base in (str, int, float):
        if isinstance(value, base):  # subclasses (enums, numpy scalars) are reduced to the plain type
            return base(value) if base is not str else str.__str__(value)
    return "<%s>" % type(value).__name__


def _prepare_messages(messages):
    out = []
    for m in messages:
        m = {k: _plain(v) for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = dict({"thinking": reasoning}, **m)
            m["reasoning_content"] = reasoning
        out.append(m)
    return out


def _make_environment():
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body and, while tracking, records its char range."""
        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            self.blocks = None      # the rendered pieces so far, while a tracked render runs
            self.spans = None

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render_block"), [], [], body).set_lineno(lineno)

        def _render_block(self, caller):
            text = caller()
            if self.blocks is not None:
                start = sum(len(b) for b in self.blocks)
                self.spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes '<', '>' and '&', which would corrupt prompts.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class LimitedDict:
        # `dict(...)` and `dict.fromkeys(...)` without exposing the dict type itself to the sandbox.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class SafeNamespace(jinja2.utils.Namespace):
        # Underscore attributes on a namespace would reach Python internals; templates may not set them.
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                SafeNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError("chat templates may not set %r on a namespace" % name)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = LimitedDict()
    env.globals["namespace"] = SafeNamespace
    return env, env.extensions[GenerationBlock.identifier]


def _common_prefix_len(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatTemplate:
    """One compiled chat template plus the named special tokens it may reference (`bos_token`, ...).

    Rendering with assistant spans keeps state on the template while it runs: use one instance per thread.
    """

    def __init__(self, source, special_tokens=None, where="chat_template"):
        import jinja2
        if not isinstance(source, str) or not source.strip():
            raise UserError("%s: expected a non-empty Jinja chat template string" % where)
        self.source = source
        self.where = where
        self.special_tokens = dict(special_tokens or {})
        self._env, self._generation = _make_environment()
        try:
            self._template = self._env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise UserError("%s: chat template does not compile: %s (template line %s)" % (where, e.message, e.lineno))
        self.has_generation_blocks = GENERATION_TAG.search(source) is not None

    def _context(self, messages, add_generation_prompt, template_kwargs):
        # As transformers: extra keyword arguments (Qwen3's `enable_thinking`, `tools`, ...) are template variables
        # and win over the named special tokens.
        ctx = dict(self.special_tokens)
        ctx.update(tools=None, documents=None)
        ctx.update((k, _plain(v)) for k, v in template_kwargs.items())
        ctx.update(messages=_prepare_messages(messages), add_generation_prompt=bool(add_generation_prompt))
        return ctx

    def _run(self, messages, add_generation_prompt, track, template_kwargs=None):
        import jinja2
        ctx = self._context(messages, add_generation_prompt, template_kwargs or {})
        try:
            if not track:
                return self._template.render(**ctx), None
            blocks, spans = [], []
            self._generation.blocks, self._generation.spans = blocks, spans
            try:
                for piece in self._template.generate(**ctx):
                    blocks.append(piece)
            finally:
                self._generation.blocks, self._generation.spans = None, None
            return "".join(blocks), spans
        except jinja2.exceptions.TemplateError as e:
            raise UserError("%s: the chat template rejected the conversation: %s"
                            % (self.where, str(e).splitlines()[0] if str(e) else type(e).__name__))

    def render(self, messages, add_generation_prompt=False, **template_kwargs):
        """The chat as one string, exactly as transformers' `apply_chat_template(..., tokenize=False, **kwargs)` gives
        it; `template_kwargs` are extra template variables (e.g. `enable_thinking=False` for Qwen3-style templates)."""
        check_messages(messages)
        return self._run(messages, add_generation_prompt, False, template_kwargs)[0]

    def render_with_assistant_spans(self, messages, add_generation_prompt=False, **template_kwargs):
        """(text, [(start, end), ...]): the rendered chat and the character ranges of the assistant turns."""
        check_messages(messages)
        kw = template_kwargs
        if self.has_generation_blocks:
            return self._run(messages, add_generation_prompt, True, kw)
        full = self._run(messages, add_generation_prompt, False, kw)[0]
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            upto = self._run(messages[:i + 1], False, False, kw)[0]
            if i == 0:
                try:
                    head = self._run([], True, False, kw)[0]
                except UserError:
                    raise UserError("%s: the conversation starts with an assistant message, which this chat "
                                    "template cannot render without a user turn" % self.where)
            else:
                head = self._run(messages[:i], True, False, kw)[0]
            if not full.startswith(upto):
                raise UserError("%s: rendering the first %d messages is not a prefix of the whole chat, so the "
                                "assistant turns cannot be located; mark them with {%% generation %%} in the template"
                                % (self.where, i + 1))
            spans.append((_common_prefix_len(head, upto), len(upto)))
        return full, spans
