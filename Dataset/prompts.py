"""Prompt templates: the text the model sees before its response, in training and inference — the reference's
Alpaca templates (docs/moa.md §6.2, the default) or a tokenizer's own chat template (`ChatPrompt`, e.g. Qwen3's)."""
import json

from Utils.errors import UserError

PROMPT_TEMPLATES = ("alpaca", "chat")

# The two templates of the reference, character for character; the response follows "### Response:" directly.
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)

# The with-input template cut where the reference tokenises it in pieces (docs/moa.md §6.3): head | input | tail.
RESPONSE_HEADER = "\n\n### Response:"


def has_input(record):
    """True when the record uses the with-input template (every math and commonsense record has input "")."""
    return record.get("input", "") != ""


def format_prompt(record):
    """The prompt for one record, ending in "### Response:" (no trailing space or newline)."""
    if has_input(record):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def input_prompt_pieces(record):
    """(head, input, response header) of the with-input prompt; their concatenation equals format_prompt."""
    head = PROMPT_WITH_INPUT.split("{input}")[0].format(instruction=record["instruction"])
    return head, record["input"], RESPONSE_HEADER


def prompt_ids(record, tokenizer, max_seq_len, min_gen_len, chat=None):
    """Token ids of a record's prompt at inference, as in training (Alpaca, or `chat`: a ChatPrompt); an input is cut
    to leave min_gen_len tokens of room."""
    if chat is not None:
        return chat.prompt_ids(record, tokenizer, max_seq_len - min_gen_len)
    if not has_input(record):
        return tokenizer.encode(format_prompt(record), bos=True, eos=False)
    head, inp, resp = input_prompt_pieces(record)
    head_ids = tokenizer.encode(head, bos=True, eos=False)
    resp_ids = tokenizer.encode(resp, bos=False, eos=False)
    in_ids = tokenizer.encode(inp, bos=False, eos=False)
    room = max(0, max_seq_len - (len(head_ids) + len(resp_ids) + min_gen_len))
    return head_ids + in_ids[:room] + resp_ids


def parse_template_kwargs(text, flag="--chat_template_kwargs"):
    """A JSON object of chat template variables (e.g. '{"enable_thinking": false}'); "" gives {}."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError("%s: not valid JSON (%s); expected an object such as '{\"enable_thinking\": false}'"
                        % (flag, e.msg))
    if not isinstance(value, dict):
        raise UserError("%s: expected a JSON object of template variables, got %s" % (flag, type(value).__name__))
    for name in ("messages", "add_generation_prompt"):  # set by the prompt itself
        if name in value:
            raise UserError("%s: %r is not a template variable one can set" % (flag, name))
    return value


class ChatPrompt:
    """The tokenizer's chat template as the prompt. A record becomes one user turn — its instruction, then its input
    after a blank line when it has one — answered by one assistant turn holding its output. Training supervises what
    the tokenizer's `encode_chat` marks as the assistant's (its text and end-of-turn token); inference renders the
    user turn with the generation prompt. `template_kwargs` are extra template variables (Qwen3's
    `enable_thinking`), the same in training and inference so both see the same assistant header."""

    def __init__(self, template_kwargs=None):
        self.template_kwargs = dict(template_kwargs or {})

    @staticmethod
    def messages(record, with_answer=True):
        user = record["instruction"] + ("\n\n" + record["input"] if has_input(record) else "")
        turns = [{"role": "user", "content": user}]
        if with_answer:
            turns.append({"role": "assistant", "content": record["output"]})
        return turns

    def example_ids(self, record, tokenizer):
        """(ids, assistant mask) of the whole exchange."""
        return tokenizer.encode_chat(self.messages(record), False, **self.template_kwargs)

    def prompt_ids(self, record, tokenizer, budget=None):
        """Token ids up to the assistant's first token. With `budget`, a too-long input is shortened (by the excess
        in tokens of the input alone, once), as the Alpaca path cuts the input rather than the instruction."""
        render = lambda r: tokenizer.encode_chat(self.messages(r, False), True, **self.template_kwargs)[0]  # noqa
        ids = render(record)
        if budget is not None and len(ids) > budget and has_input(record):
            in_ids = tokenizer.encode(record["input"], bos=False, eos=False)
            keep = max(0, len(in_ids) - (len(ids) - budget))
            ids = render(dict(record, input=tokenizer.decode(in_ids[:keep])))
        return ids
