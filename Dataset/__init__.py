"""Data side of every front end: records and Alpaca prompts (fine-tuning), pretraining packs, SFT chats, batchers,
and the generated corpora (math problems, instruction tasks)."""
import importlib

# Names resolve on first use, so `import Dataset` stays cheap (no numpy) and `python -m
# Dataset.math_generator` does not find its own module already imported by the package.
_EXPORTS = {
    "format_prompt": "Dataset.prompts",
    "load_records": "Dataset.records",
    "IGNORE_INDEX": "Dataset.encoding",
    "encode_example": "Dataset.encoding",
    "encode_example_info": "Dataset.encoding",
    "encode_dataset": "Dataset.encoding",
    "pad_batch": "Dataset.encoding",
    "lm_examples": "Dataset.encoding",
    "LMData": "Dataset.lm_batches",
    "EvalLMData": "Dataset.lm_batches",
    "PretrainData": "Dataset.pretrain_data",
    "pretrain_eval_data": "Dataset.pretrain_data",
    "load_corpus": "Dataset.pretrain_data",
    "SFTData": "Dataset.sft_data",
    "sft_eval_data": "Dataset.sft_data",
    "read_conversations": "Dataset.sft_data",
    "generate_instructions": "Dataset.instruction_generator",
    "score_answer": "Dataset.instruction_generator",
    "generate_math_dataset": "Dataset.math_generator",
    "write_splits": "Dataset.math_generator",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError("module 'Dataset' has no attribute %r" % name)
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__():
    return __all__
