"""Alpaca prompt templates (SPEC §6.2): the text the model sees before its response, in training and inference."""

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

# The with-input template cut where the reference tokenises it in pieces (SPEC §6.3): head | input | tail.
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
