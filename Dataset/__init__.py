"""Data side of the fine-tuning pipeline (SPEC §6): records, Alpaca prompts, token encoding, synthetic math."""
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
