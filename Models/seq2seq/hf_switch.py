"""HF SwitchTransformers checkpoints ↔ `Seq2SeqTransformer`: config.json fields, tensor names and the stacked
expert layout, both ways (`from_pretrained`, `save_pretrained`).

config.json → Seq2SeqConfig(style "switch"): d_model → embed_size, d_kv → head_dim, d_ff → hidden_dim (dense FFN
and every expert), num_layers / num_decoder_layers → enc_layers / dec_layers, dropout_rate → dropout,
dense_act_fn → hidden_act, and the sparse steps computed exactly as HF does from num_sparse_*_layers (including
its quirk that 0 sparse layers still makes layer 1 sparse when the stack has more than one layer). The MoE
section: top-1, fixed expert_capacity per batch row, router_jitter_noise → jitter, router_bias,
router_aux_loss_coef → aux_switch (form switch_t5), router_z_loss_coef → aux_z, router_ignore_padding_tokens →
ignore_padding. Differences kept on purpose: HF adds the auxiliary losses of a stack only when its sparse step is
> 1 (with step 1, every layer sparse, it returns 0); we always add them.

Tensor names (HF → ours): shared.weight → embed.weight; {encoder,decoder}.block.i.layer.0.SelfAttention.{q,k,v,o}
→ <stack>.layers.i.self_attn.*; block.0's relative_attention_bias → <stack>.pos_bias.relative_attention_bias;
decoder layer.1.EncDecAttention → cross_attn; layer.{0,1,2}.layer_norm → self_attn_norm / cross_attn_norm /
ffn_norm; the FF layer's mlp.wi / mlp.wo → ffn.w1 / ffn.w2; mlp.router.classifier → ffn.router.gate; expert e's
wi [F, d] → rows e·F..(e+1)·F of ffn.experts.w1, its wo [d, F] transposed → the same rows of ffn.experts.w2;
final_layer_norm → final_norm; lm_head (untied only).
"""
import json
import os

import numpy as np

from Models.seq2seq.config import Seq2SeqConfig
from Utils.checkpoint_io import read_safetensors, read_torch_pth, write_safetensors
from Utils.errors import UserError

_ACTS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}


def _sparse_step(n_layers, n_sparse):
    return n_layers // n_sparse if n_sparse > 0 else n_layers       # HF's rule, quirk included


def config_from_hf(d, source="config.json"):
    """Seq2SeqConfig from a SwitchTransformers config.json dict."""
    if d.get("model_type") not in (None, "switch_transformers"):
        raise UserError("%s: model_type %r is not switch_transformers" % (source, d.get("model_type")))
    act = d.get("dense_act_fn", "relu")
    if act not in _ACTS:
        raise UserError("%s: dense_act_fn %r is not supported (expected one of %s)" % (source, act, ", ".join(_ACTS)))
    if d.get("router_dtype", "float32") != "float32":
        raise UserError("%s: router_dtype %r: only float32 routers are supported" % (source, d["router_dtype"]))
    n_enc = int(d.get("num_layers", 12))
    n_dec = int(d.get("num_decoder_layers") or n_enc)
    moe = dict(num_experts=int(d.get("num_experts", 8)), top_k=1, expert_capacity=int(d.get("expert_capacity", 64)),
               capacity_factor=0.0, jitter=float(d.get("router_jitter_noise", 0.01)),
               router_bias=bool(d.get("router_bias", False)), aux_switch=float(d.get("router_aux_loss_coef", 1e-3)),
               aux_z=float(d.get("router_z_loss_coef", 1e-3)),
               ignore_padding=bool(d.get("router_ignore_padding_tokens", False)))
    d_model = int(d.get("d_model", 768))
    pad = int(d.get("pad_token_id", 0) or 0)
    start = d.get("decoder_start_token_id")
    return Seq2SeqConfig(
        vocab_size=int(d.get("vocab_size", 32128)), embed_size=d_model, num_heads=int(d.get("num_heads", 12)),
        head_dim=int(d.get("d_kv", 64)), hidden_dim=int(d.get("d_ff", 2048)), enc_layers=n_enc, dec_layers=n_dec,
        dropout=float(d.get("dropout_rate", 0.1)), style="switch", hidden_act=_ACTS[act],
        layer_norm_eps=float(d.get("layer_norm_epsilon", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
        encoder_sparse_step=_sparse_step(n_enc, int(d.get("num_sparse_encoder_layers", 3))),
        decoder_sparse_step=_sparse_step(n_dec, int(d.get("num_sparse_decoder_layers", 3))),
        moe=moe, pad_token_id=pad, eos_token_id=int(d.get("eos_token_id", 1) or 0),
        decoder_start_token_id=pad if start is None else int(start))


def config_to_hf(cfg):
    """config.json dict for a style "switch" Seq2SeqConfig (what transformers needs to build the same model)."""
    if cfg.style != "switch":
        raise UserError("only style 'switch' models have a SwitchTransformers equivalent")
    m = cfg.moe
    if m is not None and (m.top_k != 1 or m.gated or m.hidden_act != "relu" or m.expert_capacity < 1
                          or m.norm_topk_prob or m.shared_experts or m.router != "linear"):
        raise UserError("this MoE has no SwitchTransformers equivalent (needs top_k 1, plain ReLU experts, a fixed "
                        "expert_capacity, a linear router, no shared experts)")
    inv = {v: k for k, v in _ACTS.items() if k != "gelu_pytorch_tanh"}

    def n_sparse(n, step):   # inverse of HF's step rule for the steps it can express
        if m is None or step == 0:
            return 0
        return n // step
    d = dict(model_type="switch_transformers", architectures=["SwitchTransformersForConditionalGeneration"],
             vocab_size=cfg.vocab_size, d_model=cfg.embed_size, d_kv=cfg.head_dim, d_ff=cfg.hidden_dim,
             num_layers=cfg.enc_layers, num_decoder_layers=cfg.dec_layers, num_heads=cfg.num_heads,
             num_sparse_encoder_layers=n_sparse(cfg.enc_layers, cfg.encoder_sparse_step),
             num_sparse_decoder_layers=n_sparse(cfg.dec_layers, cfg.decoder_sparse_step),
             num_experts=m.num_experts if m else 8, expert_capacity=m.expert_capacity if m else 64,
             router_bias=m.router_bias if m else False, router_jitter_noise=m.jitter if m else 0.01,
             router_ignore_padding_tokens=m.ignore_padding if m else False,
             router_aux_loss_coef=m.aux_switch if m else 1e-3, router_z_loss_coef=m.aux_z if m else 1e-3,
             relative_attention_num_buckets=cfg.relative_attention_num_buckets,
             relative_attention_max_distance=cfg.relative_attention_max_distance, dropout_rate=cfg.dropout,
             layer_norm_epsilon=cfg.layer_norm_eps, dense_act_fn=inv[cfg.hidden_act],
             tie_word_embeddings=cfg.tie_word_embeddings, pad_token_id=cfg.pad_token_id,
             eos_token_id=cfg.eos_token_id, decoder_start_token_id=cfg.decoder_start_token_id,
             is_encoder_decoder=True)
    back = config_from_hf(d)
    if (back.encoder_moe_layers(), back.decoder_moe_layers()) != (cfg.encoder_moe_layers(), cfg.decoder_moe_layers()):
        raise UserError("sparse steps %d/%d cannot be written as num_sparse_*_layers of a SwitchTransformers config"
                        % (cfg.encoder_sparse_step, cfg.decoder_sparse_step))
    return d


def _layer_map(cfg):
    """[(hf name, our name, kind)] for every tensor; kind "expert:<e>:wi|wo" for expert slices."""
    out = [("shared.weight", "embed.weight", "plain")]
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", "lm_head.weight", "plain"))
    E = cfg.moe.num_experts if cfg.moe is not None else 0
    for stack, n, sparse in (("encoder", cfg.enc_layers, cfg.encoder_moe_layers()),
                             ("decoder", cfg.dec_layers, cfg.decoder_moe_layers())):
        out.append(("%s.block.0.layer.0.SelfAttention.relative_attention_bias.weight" % stack,
                    "%s.pos_bias.relative_attention_bias.weight" % stack, "plain"))
        out.append(("%s.final_layer_norm.weight" % stack, "%s.final_norm.weight" % stack, "plain"))
        for i in range(n):
            hf, us = "%s.block.%d.layer." % (stack, i), "%s.layers.%d." % (stack, i)
            for p in "qkvo":
                out.append((hf + "0.SelfAttention.%s.weight" % p, us + "self_attn.%s.weight" % p, "plain"))
            out.append((hf + "0.layer_norm.weight", us + "self_attn_norm.weight", "plain"))
            ff = 1
            if stack == "decoder":
                for p in "qkvo":
                    out.append((hf + "1.EncDecAttention.%s.weight" % p, us + "cross_attn.%s.weight" % p, "plain"))
                out.append((hf + "1.layer_norm.weight", us + "cross_attn_norm.weight", "plain"))
                ff = 2
            out.append((hf + "%d.layer_norm.weight" % ff, us + "ffn_norm.weight", "plain"))
            if i in sparse:
                out.append((hf + "%d.mlp.router.classifier.weight" % ff, us + "ffn.router.gate.weight", "plain"))
                if cfg.moe.router_bias:
                    out.append((hf + "%d.mlp.router.classifier.bias" % ff, us + "ffn.router.gate.bias", "plain"))
                for e in range(E):
                    for w, ours in (("wi", "w1"), ("wo", "w2")):
                        out.append((hf + "%d.mlp.experts.expert_%d.%s.weight" % (ff, e, w),
                                    us + "ffn.experts.%s" % ours, "expert:%d:%s" % (e, w)))
            else:
                out.append((hf + "%d.mlp.wi.weight" % ff, us + "ffn.w1.weight", "plain"))
                out.append((hf + "%d.mlp.wo.weight" % ff, us + "ffn.w2.weight", "plain"))
    return out


def _read_weights(ckpt_dir):
    """{name: LazyTensor or array} of every checkpoint file of the directory (sharded safetensors included)."""
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    single = os.path.join(ckpt_dir, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for fname in files:
            out.update(read_safetensors(os.path.join(ckpt_dir, fname), lazy=True))
        return out
    if os.path.isfile(single):
        return read_safetensors(single, lazy=True)
    pth = os.path.join(ckpt_dir, "pytorch_model.bin")
    if os.path.isfile(pth):
        return read_torch_pth(pth)
    raise UserError("%s: no model.safetensors, model.safetensors.index.json or pytorch_model.bin" % ckpt_dir)


def _array(v):
    return np.asarray(v.load() if hasattr(v, "load") else v, dtype=np.float32)


def hf_to_ours(tensors, cfg, source="checkpoint"):
    """{our name: float32 array} from HF tensors; missing or unexpected tensors are errors."""
    tensors = dict(tensors)
    if "shared.weight" not in tensors:   # tied copies may be the ones a file kept
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if alias in tensors:
                tensors["shared.weight"] = tensors[alias]
                break
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        v = tensors.pop(alias, None)
        # transformers 5 unties the stacks' embeddings from `shared` when tie_word_embeddings is false (4.x and
        # the released checkpoints share one table): one table is all this model has
        if v is not None and v is not tensors["shared.weight"] and not np.array_equal(_array(v),
                                                                                      _array(tensors["shared.weight"])):
            raise UserError("%s: %s differs from shared.weight (separate encoder/decoder embeddings are not "
                            "supported)" % (source, alias))
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    F, experts = cfg.hidden_dim, {}
    out = {}
    used = set()
    for hf, ours, kind in _layer_map(cfg):
        if hf not in tensors:
            raise UserError("%s: tensor %s is missing" % (source, hf))
        used.add(hf)
        a = _array(tensors[hf])
        if kind == "plain":
            out[ours] = a
            continue
        _, e, w = kind.split(":")
        experts.setdefault(ours, [None] * cfg.moe.num_experts)[int(e)] = a if w == "wi" else a.T
    for ours, parts in experts.items():
        if any(p.shape != (F, cfg.embed_size) for p in parts):
            raise UserError("%s: the experts of %s do not have shape [%d, %d]" % (source, ours, F, cfg.embed_size))
        out[ours] = np.concatenate(parts, 0)
    extra = sorted(set(tensors) - used)
    if extra:
        raise UserError("%s: unexpected tensor %s" % (source, extra[0]))
    return out


def ours_to_hf(state, cfg):
    """{hf name: float32 array} from our parameters (the inverse of hf_to_ours)."""
    F = cfg.hidden_dim
    out = {}
    for hf, ours, kind in _layer_map(cfg):
        a = np.asarray(state[ours], np.float32)
        if kind == "plain":
            out[hf] = a
        else:
            _, e, w = kind.split(":")
            block = a[int(e) * F:(int(e) + 1) * F]
            out[hf] = np.ascontiguousarray(block if w == "wi" else block.T)
    return out


def load_state(model, arrays, source):
    """Strict load: same names, same shapes, cast to each parameter's dtype."""
    from Utils.runtime import import_jittor
    jt = import_jittor()
    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
    if missing or extra:
        raise UserError("%s: %s parameter %s" % (source, "missing" if missing else "unexpected", (missing or extra)[0]))
    for name, p in params.items():
        a = arrays[name]
        if tuple(a.shape) != tuple(p.shape):
            raise UserError("%s: %s has shape %s, the model has %s" % (source, name, tuple(a.shape), tuple(p.shape)))
        p.update(jt.array(np.asarray(a, np.float32)).cast(p.dtype))
    jt.sync(list(params.values()))


def from_pretrained(ckpt_dir, tokenizer=None):
    """A Seq2SeqTransformer with the weights of a SwitchTransformers directory (config.json + safetensors)."""
    from Models.seq2seq.model import Seq2SeqTransformer
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError("%s: config.json not found" % ckpt_dir)
    with open(path) as f:
        cfg = config_from_hf(json.load(f), path)
    model = Seq2SeqTransformer(cfg, tokenizer)
    load_state(model, hf_to_ours(_read_weights(ckpt_dir), cfg, ckpt_dir), ckpt_dir)
    return model


def save_pretrained(model, out_dir):
    """config.json + model.safetensors that transformers' SwitchTransformersForConditionalGeneration loads."""
    d = config_to_hf(model.cfg)
    state = {n: p.numpy() for n, p in model.named_parameters()}
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), ours_to_hf(state, model.cfg))
    tmp = os.path.join(out_dir, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(d, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "config.json"))
