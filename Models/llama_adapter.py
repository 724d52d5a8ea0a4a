"""`LLaMA_adapter`: the frozen LLaMA-3 base plus MoA / MoE-LoRA adapters — loss, logits, generation, loading.

The reference wraps its Transformer as `self.llama`, so adapter keys read `llama.layers.{i}...` in both projects.
"""
import os

import numpy as np

from Models.llama import Transformer
from Models.model_args import FieldError, ModelArgs
from Models.tokenizer import Tokenizer
from Utils.errors import UserError
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn

IGNORE_INDEX = -100
ADAPTER_KEYWORDS = ("lora", "prompt", "adapter")  # SPEC §4.1 selection rule


def is_adapter_param(name):
    return any(k in name for k in ADAPTER_KEYWORDS)


class LLaMA_adapter(nn.Module):
    def __init__(self, args: ModelArgs, tokenizer=None):
        from Models.moa import attach_adapters
        self.args = args
        self.tokenizer = tokenizer
        self.llama = Transformer(args)
        attach_adapters(self.llama, args)
        self._mark_only_adapters_trainable()
        if args.dtype != "float32":
            for name, p in self.named_parameters():
                if not is_adapter_param(name):
                    p.assign(p.cast(args.dtype))

    # ------------------------------------------------------------------ parameters
    def _mark_only_adapters_trainable(self):
        """Freeze the base, keep adapters trainable in fp32. Runs before any eval() (JITTOR_NOTES A2)."""
        for name, p in self.named_parameters():
            if is_adapter_param(name):
                if p.dtype != "float32":
                    p.assign(p.float32())
                p.start_grad()
            else:
                p.stop_grad()
        self._trainable_names = tuple(n for n, _ in self.named_parameters() if is_adapter_param(n))
        # Jittor draws random inits lazily: materialise the (small) adapters now so a seed fixes their values.
        jt.sync([p for n, p in self.named_parameters() if is_adapter_param(n)])

    def train(self):
        # Jittor's train() re-enables gradients recorded by its first eval(); we keep our own frozen set instead.
        super().train()
        self._restore_grad_state()
        self.llama.free_caches()
        return self

    def eval(self):
        super().eval()
        self._restore_grad_state()
        return self

    def _restore_grad_state(self):
        trainable = set(self._trainable_names)
        for name, p in self.named_parameters():
            if name in trainable:
                p.start_grad()
            else:
                p.stop_grad()
        for m in self.modules():  # drop Jittor's bookkeeping so a later train() cannot un-freeze the base
            if hasattr(m, "backup_grad_state"):
                m.backup_grad_state = {}

    def trainable_parameters(self):
        """(name, Var) of every adapter/router/threshold parameter — the only ones an optimizer may see."""
        params = dict(self.named_parameters())
        return [(n, params[n]) for n in self._trainable_names]

    def num_trainable_params(self):
        return int(sum(int(np.prod(p.shape)) for _, p in self.trainable_parameters()))

    def adapter_state_dict(self):
        """{reference key name: np.float32 array} of the adapter parameters only."""
        return {n: p.numpy().astype(np.float32) for n, p in self.trainable_parameters()}

    # ------------------------------------------------------------------ training
    def execute(self, tokens, labels):
        """Training loss: shifted cross-entropy over supervised positions (+ load-balance loss for MoE-LoRA).

        Returns (loss, ce_loss, lb_loss); lb_loss is None when the variant has none.
        """
        from Models.losses import head_cross_entropy
        from Models.moa import collect_aux_losses
        h = self.llama.hidden_states(tokens)                     # [B, T, d]
        d = h.shape[-1]
        h = h[:, :-1, :].reshape(-1, d)
        target = labels[:, 1:].reshape(-1)
        # The 128k-vocab projection is the costliest op of a small model: run it on supervised positions only.
        rows = jt.nonzero(target >= 0).reshape(-1)
        if rows.shape[0] == 0:
            ce = h.sum() * 0.0  # nothing supervised: a zero loss that still has a graph (as the reference)
        else:
            ce = head_cross_entropy(h[rows], self.llama.output.weight, target[rows])
        lb = collect_aux_losses(self.llama)
        if lb is not None and self.args.lb_loss_coeff:
            return ce + self.args.lb_loss_coeff * lb, ce, lb
        return ce, ce, lb

    # ------------------------------------------------------------------ inference
    def logits(self, tokens):
        """int array [B, T] → numpy float32 [B, T, vocab]: full causal forward, no cache."""
        tokens = np.asarray(tokens)
        with jt.no_grad():
            out = self.llama(jt.array(tokens.astype(np.int32)))
            res = out.numpy()
        jt.gc()
        return res

    def generate(self, prompt_tokens, max_gen_len, temperature=0.0, top_p=0.75, seed=None, on_step=None, top_k=0,
                 repetition_penalty=1.0):
        """Batched generation with the KV cache: prefill the common prefix, then one token per step (SPEC §7).

        Greedy at temperature 0, else temperature + top-k (0 = off) + top-p sampling; `repetition_penalty` (1.0 =
        off) as Hugging Face's. Returns the generated token lists (prompt excluded), each cut at its first stop
        token (D8).
        """
        from Models.generation import generate
        return generate(self, prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, seed=seed,
                        on_step=on_step, top_k=top_k, repetition_penalty=repetition_penalty)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, ckpt_dir, adapter_path=None, tokenizer_path=None, **overrides):
        """Build from a Meta (`params.json` + `consolidated.*.pth`) or HF (`config.json` + safetensors) directory.

        `adapter_path`: an adapter file or a directory holding one with `adapter_params.json` beside it; its
        configuration is applied before `overrides` (ModelArgs field names). Returns the model in eval mode.
        """
        from Utils import checkpoint_io
        from Models.adapter_io import adapter_params_path, load_adapter_config, load_adapter_weights
        if not os.path.isdir(ckpt_dir):
            raise UserError("%s: checkpoint directory not found" % ckpt_dir)
        adapter_cfg = load_adapter_config(adapter_path, overrides.get("routing")) if adapter_path else {}
        merged = dict(adapter_cfg)
        merged.update({k: v for k, v in overrides.items() if v is not None})
        meta_params = os.path.join(ckpt_dir, "params.json")
        try:
            if os.path.isfile(meta_params):
                args = ModelArgs.from_params_json(meta_params, **merged)
                state = checkpoint_io.load_meta_checkpoint(ckpt_dir)
            elif os.path.isfile(os.path.join(ckpt_dir, "config.json")):
                args = ModelArgs.from_hf_config(os.path.join(ckpt_dir, "config.json"), **merged)
                state = checkpoint_io.load_hf_checkpoint(ckpt_dir, args)
            else:
                raise UserError("%s: neither params.json (Meta) nor config.json (Hugging Face) found" % ckpt_dir)
        except FieldError as e:  # a bad value read from adapter_params.json names that file
            if e.field in adapter_cfg and overrides.get(e.field) is None:
                raise UserError("%s: %s" % (adapter_params_path(adapter_path), e))
            raise
        tok_file = tokenizer_path or os.path.join(ckpt_dir, "tokenizer.model")
        tokenizer = Tokenizer(tok_file if os.path.isfile(tok_file) or tokenizer_path else None)
        if tokenizer.n_words != args.vocab_size:
            raise UserError("%s: tokenizer has %d ids but vocab_size is %d" % (tok_file, tokenizer.n_words,
                                                                                args.vocab_size))
        model = cls(args, tokenizer)
        checkpoint_io.strict_load(model.llama, state, source=ckpt_dir, allow_missing=is_adapter_param)
        del state
        if adapter_path:
            load_adapter_weights(model, adapter_path)
        model.eval()
        return model

