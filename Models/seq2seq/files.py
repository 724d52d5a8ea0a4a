"""Model directories of the encoder–decoder: ours (`model_config.json` + `model.safetensors` with our parameter
names + the tokenizer files) and HF SwitchTransformers' (`config.json` with model_type switch_transformers), one
loader for both.
"""
import json
import os
import shutil

import numpy as np

from Models.seq2seq.config import Seq2SeqConfig
from Utils.checkpoint_io import read_safetensors, write_safetensors
from Utils.errors import UserError

CONFIG = "model_config.json"
WEIGHTS = "model.safetensors"


def save_model(model, out_dir, tokenizer_dir=None, weights=None):
    """Write model_config.json, model.safetensors (fp32; `weights` {name: array} overrides the model's own) and a
    copy of the tokenizer files; every file is written to a temporary name and renamed."""
    os.makedirs(out_dir, exist_ok=True)
    state = weights if weights is not None else {n: p.numpy() for n, p in model.named_parameters()}
    write_safetensors(os.path.join(out_dir, WEIGHTS), {n: np.asarray(v, np.float32) for n, v in state.items()})
    tmp = os.path.join(out_dir, CONFIG + ".tmp")
    with open(tmp, "w") as f:
        json.dump(model.cfg.to_dict(), f, indent=1)
    os.replace(tmp, os.path.join(out_dir, CONFIG))
    if tokenizer_dir:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
                shutil.copyfile(src, os.path.join(out_dir, name + ".tmp"))
                os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))


def load_model(path, tokenizer=None):
    """A Seq2SeqTransformer from one of our directories or an HF SwitchTransformers directory (eval mode). The
    tokenizer defaults to the directory's tokenizer.json when there is one."""
    from Models.seq2seq.hf_switch import from_pretrained, load_state
    from Models.seq2seq.model import Seq2SeqTransformer
    if tokenizer is None and os.path.isfile(os.path.join(path, "tokenizer.json")):
        from Models.hf_tokenizer import HFTokenizer
        tokenizer = HFTokenizer(path)
    if os.path.isfile(os.path.join(path, CONFIG)):
        cfg = Seq2SeqConfig.from_json(os.path.join(path, CONFIG))
        model = Seq2SeqTransformer(cfg, tokenizer)
        load_state(model, read_safetensors(os.path.join(path, WEIGHTS)), path)
    elif os.path.isfile(os.path.join(path, "config.json")):
        model = from_pretrained(path, tokenizer)
    else:
        raise UserError("%s: neither %s (ours) nor config.json (HF SwitchTransformers)" % (path, CONFIG))
    model.eval()
    return model
