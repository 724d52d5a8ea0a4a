"""Oracle: Hugging Face LlamaForCausalLM logits for token batches (run in its own process, torch only).

usage: python tests/oracles/hf_logits.py HF_CKPT_DIR TOKENS.npy OUT.npy
Kept out of the Jittor process: torch and Jittor each bring their own oneDNN/MKL runtime.
"""
import sys

import numpy as np
import torch
from transformers import LlamaForCausalLM


def main(ckpt_dir, tokens_path, out_path):
    model = LlamaForCausalLM.from_pretrained(ckpt_dir, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tokens = torch.tensor(np.load(tokens_path).astype(np.int64))
    with torch.no_grad():
        logits = model(tokens).logits.float().numpy()
    np.save(out_path, logits)


if __name__ == "__main__":
    main(*sys.argv[1:4])
