"""Training examples as token ids plus aligned labels (docs/moa.md §6.3 with decisions D4, D5, D6 in docs/moa.md §10),
framed by the
Alpaca prompt or, with a `Dataset.prompts.ChatPrompt`, by the tokenizer's chat template."""
from collections import namedtuple

import numpy as np

from Dataset.prompts import format_prompt, has_input, input_prompt_pieces

# Label value for positions the loss ignores (prompt and padding). Token ids are >= 0, so -100 can never
# be mistaken for a real token; unlike the reference's 0, token 0 ("!") is trained inside answers (D4).
IGNORE_INDEX = -100
# Input ids fed at padded positions; they are never supervised, and the causal mask keeps them from
# influencing real positions on the right-padded rows.
PAD_ID = 0

# input_ids/labels: python int lists of equal length (labels NOT shifted: labels[t] is the target for the
# token at t, so the trainer compares logits[:, :-1] with labels[:, 1:]). n_prompt: masked prompt positions
# that remain. n_dropped: tokens cut to fit max_seq_len (0 when the example fits).
Encoded = namedtuple("Encoded", ["input_ids", "labels", "n_prompt", "n_dropped"])


def _encode_no_input(record, tokenizer):
    # D6: the reference tokenises prompt+output as ONE string, so the prompt's final ":" merges with the
    # output's leading "\n" into ":\n"; the mask length still comes from the prompt alone, as there.
    prompt = format_prompt(record)
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    ids = tokenizer.encode(prompt + record["output"], bos=True, eos=True)
    return ids, min(len(prompt_ids), len(ids))


def _encode_with_input(record, tokenizer, max_seq_len):
    # Pieces tokenised separately (docs/moa.md §6.3). Like the reference, the input is what gives way when the
    # prompt is too long, here just enough to leave room for one answer token.
    head, inp, resp = input_prompt_pieces(record)
    head_ids = tokenizer.encode(head, bos=True, eos=False)
    in_ids = tokenizer.encode(inp, bos=False, eos=False)
    resp_ids = tokenizer.encode(resp, bos=False, eos=False)
    out_ids = tokenizer.encode(record["output"], bos=False, eos=True)
    room = max(0, max_seq_len - 1 - len(head_ids) - len(resp_ids))
    n_cut_input = max(0, len(in_ids) - room)
    in_ids = in_ids[:len(in_ids) - n_cut_input]
    prompt_ids = head_ids + in_ids + resp_ids
    return prompt_ids + out_ids, len(prompt_ids), n_cut_input


def _encode_chat(record, tokenizer, chat, max_seq_len):
    # The chat template decides the framing; supervised = what the tokenizer marks as the assistant's.
    ids, mask = chat.example_ids(record, tokenizer)
    n_dropped = max(0, len(ids) - max_seq_len)
    ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    n_prompt = next((i for i, m in enumerate(mask) if m), len(ids))
    return Encoded(ids, labels, n_prompt, n_dropped)


def encode_example_info(record, tokenizer, max_seq_len, chat=None):
    """Encode one record and report what truncation did (see `Encoded`); `chat` (a Dataset.prompts.ChatPrompt)
    uses the tokenizer's chat template instead of the Alpaca prompt.

    D5: an over-long example loses tokens from the END (the answer tail, then its EOS), so the label mask
    stays aligned with the tokens kept and BOS survives. If even the prompt does not fit, its end is cut
    too and every label is IGNORE_INDEX: the example is still a valid row but contributes no loss.
    """
    if max_seq_len < 1:
        raise ValueError("max_seq_len must be >= 1, got %r" % (max_seq_len,))
    if chat is not None:
        return _encode_chat(record, tokenizer, chat, max_seq_len)
    n_cut_input = 0
    if has_input(record):
        ids, n_prompt, n_cut_input = _encode_with_input(record, tokenizer, max_seq_len)
    else:
        ids, n_prompt = _encode_no_input(record, tokenizer)
    n_dropped = max(0, len(ids) - max_seq_len) + n_cut_input
    ids = ids[:max_seq_len]
    n_prompt = min(n_prompt, len(ids))
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return Encoded(ids, labels, n_prompt, n_dropped)


def encode_example(record, tokenizer, max_seq_len):
    """(input_ids, labels): unpadded python int lists of equal length, prompt labels = IGNORE_INDEX."""
    enc = encode_example_info(record, tokenizer, max_seq_len)
    return enc.input_ids, enc.labels


def encode_dataset(records, tokenizer, max_seq_len, chat=None):
    """Encode every record; returns ([(input_ids, labels), ...], number of truncated examples) for the log."""
    examples, n_truncated = [], 0
    for record in records:
        enc = encode_example_info(record, tokenizer, max_seq_len, chat)
        examples.append((enc.input_ids, enc.labels))
        n_truncated += enc.n_dropped > 0
    return examples, n_truncated


def pad_batch(examples, pad_to=None):
    """Right-pad [(input_ids, labels), ...] to a common length T (the longest, or `pad_to`).

    Returns (input ids int32 [B, T] padded with PAD_ID, labels int32 [B, T] padded with IGNORE_INDEX).
    """
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    longest = max(len(ids) for ids, _ in examples)
    T = longest if pad_to is None else pad_to
    if T < longest:
        raise ValueError("pad_to=%d is shorter than the longest example (%d tokens)" % (T, longest))
    inputs = np.full((len(examples), T), PAD_ID, dtype=np.int32)
    labels = np.full((len(examples), T), IGNORE_INDEX, dtype=np.int32)
    for b, (ids, lab) in enumerate(examples):
        if len(ids) != len(lab):
            raise ValueError("example %d: %d input ids but %d labels" % (b, len(ids), len(lab)))
        inputs[b, :len(ids)] = ids
        labels[b, :len(lab)] = lab
    return inputs, labels


def lm_examples(records, tokenizer, max_seq_len):
    """Plain language modelling on formatted records: every token of every example is a target (labels = ids)."""
    examples, _ = encode_dataset(records, tokenizer, max_seq_len)
    return [(ids, list(ids)) for ids, _ in examples]
