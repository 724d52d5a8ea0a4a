"""The encoder–decoder MoE (seed 003, Switch-compatible): config (`config.py`), attention and positions
(`attention.py`), blocks and stacks (`blocks.py`), the decoder's causal-capacity MoE (`moe_ffn.py`), gradient
checkpointing (`recompute.py`), the model (`model.py`), generation (`generate.py`) and HF SwitchTransformers
checkpoints (`hf_switch.py`).

`Seq2SeqConfig` imports without Jittor; the other names load on first use.
"""
from Models.seq2seq.config import Seq2SeqConfig

_LAZY = {"Seq2SeqTransformer": "model", "DecoderCache": "model", "generate": "generate",
         "from_pretrained": "hf_switch", "save_pretrained": "hf_switch", "config_from_hf": "hf_switch"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module("Models.seq2seq." + _LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["Seq2SeqConfig"] + sorted(_LAZY)
