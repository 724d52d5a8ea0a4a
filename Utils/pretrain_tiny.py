"""Full-parameter training of a tiny LLaMA-3-shaped base on records (the demo's "base that speaks the format").

Not part of MoA: the demo needs a base model that knows the prompt format before adapters are tuned on a task it
has not seen. Single process, every parameter trainable, answer tokens supervised; writes a Meta checkpoint.
"""
import json
import os
import time

import numpy as np

from Utils.runtime import import_jittor, seed_everything


def pretrain_tiny_base(out_dir, records, tokenizer, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128,
                       steps=300, batch_size=16, lr=3e-3, warmup=30, seed=0, log=print):
    """Train a fresh tiny base on `records` and write `params.json` + `consolidated.00.pth` + tokenizer to out_dir."""
    import shutil

    from Dataset import encode_dataset, pad_batch
    from Models.llama_adapter import LLaMA_adapter
    from Models.model_args import ModelArgs
    from Utils.checkpoint_io import write_torch_pth
    jt = import_jittor()
    seed_everything(seed)
    params = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=tokenizer.n_words,
                  multiple_of=32, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=max_seq_len)
    args = ModelArgs.create(params, {"routing": "soft_moe"}, source="pretrain_tiny_base")
    model = LLaMA_adapter(args, tokenizer)
    for name, p in model.named_parameters():  # small init for a stable start from scratch
        if name.endswith("norm.weight"):
            continue
        std = 0.02 if "tok_embeddings" not in name else 0.05
        p.update(jt.randn(p.shape) * std)
    params_list = [p for _, p in model.named_parameters()]
    for p in params_list:
        p.start_grad()
    model._trainable_names = tuple(n for n, _ in model.named_parameters())
    opt = jt.optim.AdamW(params_list, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    examples, n_cut = encode_dataset(records, tokenizer, max_seq_len)
    rng = np.random.default_rng(seed)
    model.train()
    t0, losses = time.time(), []
    for step in range(steps):
        idx = rng.choice(len(examples), size=batch_size, replace=False)
        tokens, labels = pad_batch([examples[i] for i in idx])
        opt.lr = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        loss, _, _ = model(jt.array(tokens), jt.array(labels))
        opt.step(loss)
        losses.append(loss.item())
        if (step + 1) % 25 == 0 or step == 0:
            log("  base step %d/%d  loss %.3f  (%.1fs)" % (step + 1, steps, np.mean(losses[-25:]), time.time() - t0))
    os.makedirs(out_dir, exist_ok=True)
    state = {n: p.numpy().astype(np.float32) for n, p in model.llama.state_dict().items()}
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_torch_pth(os.path.join(tmp, "consolidated.00.pth"), state)
    with open(os.path.join(tmp, "params.json"), "w") as f:
        json.dump({k: v for k, v in params.items() if k != "max_seq_len"}, f, indent=2)
    shutil.copyfile(tokenizer.model_path, os.path.join(tmp, "tokenizer.model"))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return losses
