"""`LLaMA_adapter`: the frozen LLaMA-3 base plus MoA / MoE-LoRA adapters — loss, logits, generation, loading.

The reference wraps its Transformer as `self.llama`, so adapter keys read `llama.layers.{i}...` in both projects.
"""
import os

import numpy as np

from Models.llama import Transformer
from Models.model_args import FieldError, ModelArgs
from Models.tokenizer import Tokenizer, load_tokenizer
from Utils.errors import UserError
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn

IGNORE_INDEX = -100
ADAPTER_KEYWORDS = ("lora", "prompt", "adapter")  # MoA's selection rule (docs/moa.md): adapters, routers, Γ
MOE_KEYWORDS = (".feed_forward.router.", ".feed_forward.noise.", ".feed_forward.experts.", ".feed_forward.shared.")
ROUTER_KEYWORDS = (".feed_forward.router.", ".feed_forward.noise.", ".feed_forward.shared.gate.")


def is_adapter_param(name):
    return any(k in name for k in ADAPTER_KEYWORDS)


def is_moe_param(name):
    """Parameters of the mixture-of-experts layers: routers, noise projections, routed and shared experts."""
    return any(k in name for k in MOE_KEYWORDS)


def is_router_param(name):
    return any(k in name for k in ROUTER_KEYWORDS)


# What trains, by name: MoA's default (adapters), everything (pretraining, full SFT), or one part of an MoE base
# (LLaMA-Factory's "freeze" tuning of an upcycled model). A callable on parameter names is accepted as well.
TRAINABLE = {"adapters": is_adapter_param, "all": lambda name: True, "moe": is_moe_param, "router": is_router_param,
             "none": lambda name: False}


def trainable_predicate(spec):
    if callable(spec):
        return spec
    if spec not in TRAINABLE:
        raise UserError("--trainable: %r is not one of %s" % (spec, ", ".join(TRAINABLE)))
    return TRAINABLE[spec]


class LLaMA_adapter(nn.Module):
    def __init__(self, args: ModelArgs, tokenizer=None, trainable="adapters"):
        from Models.moa import attach_adapters
        self.args = args
        self.tokenizer = tokenizer
        self.llama = Transformer(args)
        attach_adapters(self.llama, args)
        self._last_selections = []
        self.set_trainable(trainable)

    # ------------------------------------------------------------------ parameters
    def set_trainable(self, spec="adapters"):
        """Choose what trains (a TRAINABLE name or a predicate on parameter names); the rest is frozen and, on a
        non-fp32 `dtype`, cast to it. Trainable parameters are fp32. Runs before any eval() (docs/jittor_notes.md:
        Jittor's first eval() records the trainable set that a later train() restores)."""
        wanted = trainable_predicate(spec)
        if spec == "adapters" and self.args.w_bias:  # the reference's w_bias: norms and biases train too
            wanted = lambda name: is_adapter_param(name) or name.endswith("norm.weight") or name.endswith(".bias")  # noqa: E731
        named = list(self.named_parameters())
        for name, p in named:
            if wanted(name):
                if p.dtype != "float32":
                    p.assign(p.float32())
                p.start_grad()
            else:
                if self.args.dtype != "float32" and p.dtype != self.args.dtype:
                    p.assign(p.cast(self.args.dtype))
                p.stop_grad()
        self._trainable_names = tuple(n for n, _ in named if wanted(n))
        # Jittor draws random inits lazily: materialise the trainable weights now so a seed fixes their values.
        jt.sync([p for n, p in named if wanted(n)])
        for m in self.modules():
            if hasattr(m, "backup_grad_state"):
                m.backup_grad_state = {}
        return self

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
        """(name, Var) of every trainable parameter — the only ones an optimizer may see."""
        params = dict(self.named_parameters())
        return [(n, params[n]) for n in self._trainable_names]

    def gradientless_parameters(self):
        """Trainable parameters the loss never reaches: sparse MoA's threshold Γ with threshold_grad "none" (the
        reference's mask is a comparison, so Γ gets no gradient). Optimizers leave them untouched, as torch does."""
        if self.args.threshold_grad != "none":
            return []
        return [n for n in self._trainable_names if ".adapter_threshold_fn." in n]

    def num_trainable_params(self):
        return int(sum(int(np.prod(p.shape)) for _, p in self.trainable_parameters()))

    def adapter_state_dict(self):
        """{reference key name: np.float32 array} of the adapter parameters only."""
        return {n: p.numpy().astype(np.float32) for n, p in self.trainable_parameters() if is_adapter_param(n)}

    # ------------------------------------------------------------------ training
    def _lm_loss(self, tokens, labels, token_mask=None):
        """Shifted cross-entropy over the supervised positions (labels >= 0), the head fused with the loss."""
        from Models.losses import head_cross_entropy
        h = self.llama.hidden_states(tokens, token_mask=token_mask)   # [B, T, d]
        d = h.shape[-1]
        h = h[:, :-1, :].reshape(-1, d)
        target = labels[:, 1:].reshape(-1)
        # The vocabulary projection is the costliest op of a small model: run it on supervised positions only.
        rows = jt.nonzero(target >= 0).reshape(-1)
        if rows.shape[0] == 0:
            return h.sum() * 0.0, False  # nothing supervised: a zero loss that still has a graph (as the reference)
        return head_cross_entropy(h[rows], self.llama.head_weight, target[rows]), True

    def loss_terms(self, batch):
        """{name: unweighted scalar}: "lm" (token-mean cross-entropy), "aux_lb" (MoA's MoE-LoRA load balance) and
        the MoE core's auxiliary losses ("aux_switch", "aux_z", ...) whose coefficient is on. `batch`: tokens,
        labels and optionally token_mask (True on real tokens; keeps padding out of the routers' statistics)."""
        from Models.moa import collect_aux_losses
        from Models.moe.aux_losses import aux_loss_terms
        lm, supervised = self._lm_loss(batch["tokens"], batch["labels"], batch.get("token_mask"))
        terms = {"lm": lm}
        lb = collect_aux_losses(self.llama)
        if lb is not None and supervised:  # the reference adds the load balance only to a supervised batch's loss
            terms["aux_lb"] = lb
        sels = self.llama.pop_selections()
        self._last_selections = [(i, sel.detach()) for i, sel in sels]
        if sels:
            terms.update(aux_loss_terms([sel for _, sel in sels], self.args.moe))
        return terms

    def loss_weights(self):
        """{term: coefficient}: total loss = Σ coefficient · term (a term without a coefficient is only logged)."""
        weights = {"lm": 1.0}
        if self.args.is_moe_lora:
            weights["aux_lb"] = self.args.lb_loss_coeff
        if self.args.moe is not None:
            weights.update(self.args.moe.aux_weights())
        return weights

    def routing_load(self):
        """{layer: kept assignments per expert} of the last training forward's MoE layers (numpy; syncs)."""
        from Models.moe.aux_losses import expert_load
        return {i: expert_load(sel) for i, sel in self._last_selections}

    def execute(self, tokens, labels, token_mask=None):
        """Training loss: (total, LM cross-entropy, auxiliary part or None). The total is Σ loss_weights·terms."""
        batch = {"tokens": tokens, "labels": labels}
        if token_mask is not None:
            batch["token_mask"] = token_mask
        terms = self.loss_terms(batch)
        weights = self.loss_weights()
        total = terms["lm"]
        aux = None
        for name, value in terms.items():
            if name != "lm" and weights.get(name):
                total = total + weights[name] * value
        if "aux_lb" in terms:
            aux = terms["aux_lb"]
        elif len(terms) > 1:
            aux = sum((weights.get(n, 0.0) * v for n, v in terms.items() if n != "lm"), terms["lm"] * 0.0)
        return total, terms["lm"], aux

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
        """Batched generation with the KV cache: prefill the common prefix, then one token per step (docs/moa.md §7).

        Greedy at temperature 0, else temperature + top-k (0 = off) + top-p sampling; `repetition_penalty` (1.0 =
        off) as Hugging Face's. Returns the generated token lists (prompt excluded), each cut at its first stop
        token (D8).
        """
        from Models.generation import generate
        return generate(self, prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, seed=seed,
                        on_step=on_step, top_k=top_k, repetition_penalty=repetition_penalty)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, ckpt_dir, adapter_path=None, tokenizer_path=None, trainable="adapters", **overrides):
        """Build from a Meta (`params.json` + `consolidated.*.pth`) or HF (`config.json` + safetensors) directory.

        `adapter_path`: an adapter file or a directory holding one with `adapter_params.json` beside it; its
        configuration is applied before `overrides` (ModelArgs field names). Returns the model in eval mode.
        """
        from Models import checkpoints
        from Models.adapter_io import adapter_params_path, load_adapter_config, load_adapter_weights
        if not os.path.isdir(ckpt_dir):
            raise UserError("%s: checkpoint directory not found" % ckpt_dir)
        adapter_cfg = load_adapter_config(adapter_path, overrides.get("routing")) if adapter_path else {}
        merged = dict(adapter_cfg)
        merged.update({k: v for k, v in overrides.items() if v is not None})
        try:
            args, state = checkpoints.read_checkpoint(ckpt_dir, **merged)
        except FieldError as e:  # a bad value read from adapter_params.json names that file
            if e.field in adapter_cfg and overrides.get(e.field) is None:
                raise UserError("%s: %s" % (adapter_params_path(adapter_path), e))
            raise
        tok_source = tokenizer_path or _tokenizer_in(ckpt_dir)
        tokenizer = load_tokenizer(tok_source)
        if tokenizer.n_words > args.vocab_size or (tokenizer.n_words != args.vocab_size
                                                    and isinstance(tokenizer, Tokenizer)):
            raise UserError("%s: tokenizer has %d ids but vocab_size is %d" % (
                tok_source or "the LLaMA-3 tokenizer", tokenizer.n_words, args.vocab_size))
        model = cls(args, tokenizer, trainable=trainable)
        # consume: each tensor is read (HF: from its file) and freed as it lands, never a second copy of the model
        checkpoints.strict_load(model.llama, state, source=ckpt_dir, allow_missing=is_adapter_param, consume=True)
        if adapter_path:
            load_adapter_weights(model, adapter_path)
        model.eval()
        return model

    def save_pretrained(self, out_dir):
        """Our checkpoint of the base (params.json + consolidated.00.pth + tokenizer files), written atomically;
        adapters are saved apart (Models.adapter_io.save_adapter). See Models.checkpoints.save_pretrained."""
        from Models.checkpoints import save_pretrained
        return save_pretrained(self, out_dir)


def _tokenizer_in(ckpt_dir):
    """The checkpoint's own tokenizer (tokenizer.model or tokenizer.json) or None: the LLaMA-3 default."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.isfile(os.path.join(ckpt_dir, name)):
            return ckpt_dir
    return None
