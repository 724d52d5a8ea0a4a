"""Hugging Face `config.json` ↔ `ModelArgs` for the causal-LM families that run on our one Transformer.

Families (model_type → class): `llama` LlamaForCausalLM, `mixtral` MixtralForCausalLM, `qwen2_moe`
Qwen2MoeForCausalLM, `qwen3` Qwen3ForCausalLM. `params_from_hf` reads every field of a config (an unknown field, or a
setting we do not implement — sliding-window attention that is really used, rope_scaling kinds other than
Llama-3.1's, attention dropout, an MLP bias — is a one-line error naming the field); `hf_config_for` writes the
config of a family and refuses, in one line, every ModelArgs / MoEConfig field the family cannot express (the table
is in `Models/checkpoints.py`'s docstring). Imports no Jittor.
"""
from Utils.errors import UserError

FAMILIES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
DEFAULT_THETA = {"llama": 10000.0, "mixtral": 1000000.0, "qwen2_moe": 10000.0, "qwen3": 10000.0}
DEFAULT_EPS = {"llama": 1e-6, "mixtral": 1e-5, "qwen2_moe": 1e-6, "qwen3": 1e-6}
ACTS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_new": "gelu_tanh"}
HF_ACT = {"silu": "silu", "relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# Fields every PretrainedConfig may carry that do not change the forward (ids, bookkeeping, generation defaults).
_HARMLESS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache", "initializer_range",
    "max_position_embeddings", "output_router_logits", "_name_or_path", "output_hidden_states", "output_attentions",
    "return_dict", "torchscript", "use_bfloat16", "tie_encoder_decoder", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "id2label", "label2id", "num_labels", "problem_type",
    "tokenizer_class", "prefix", "task_specific_params", "chunk_size_feed_forward", "pruned_heads",
    "finetuning_task", "tf_legacy_loss", "pretraining_tp", "max_window_layers", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "diversity_penalty", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "output_scores", "return_dict_in_generate"}
_COMMON = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
           "rope_parameters", "tie_word_embeddings", "attention_dropout"}
_OWN = {"llama": {"attention_bias", "mlp_bias"},
        "mixtral": {"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise",
                    "sliding_window"},
        "qwen2_moe": {"num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                      "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "qkv_bias",
                      "use_sliding_window", "sliding_window", "layer_types"},
        "qwen3": {"attention_bias", "use_sliding_window", "sliding_window", "layer_types"}}
_MISSING = object()


def family_of(cfg, source):
    """The family of a config.json: its model_type, checked against (or else taken from) `architectures`."""
    arch = cfg.get("architectures") or []
    if not isinstance(arch, list):
        raise UserError("%s: field 'architectures' must be a list, got %r" % (source, arch))
    mt = cfg.get("model_type")
    if mt is None:
        mt = next((f for f, cls in FAMILIES.items() if cls in arch), None)
        if mt is None:
            raise UserError("%s: missing field 'model_type' (and architectures %r name no supported family: %s)"
                            % (source, arch, ", ".join(FAMILIES.values())))
    if mt not in FAMILIES:
        raise UserError("%s: model_type %r is not supported (supported: %s)" % (source, mt, ", ".join(FAMILIES)))
    if arch and FAMILIES[mt] not in arch:
        raise UserError("%s: architectures %r: only %s is supported for model_type %r"
                        % (source, arch, FAMILIES[mt], mt))
    return mt


def _get(cfg, key, source, kind=int, default=_MISSING):
    v = cfg.get(key, default) if default is not _MISSING else cfg.get(key, _MISSING)
    if v is _MISSING:
        raise UserError("%s: missing field %r" % (source, key))
    if v is None or kind is None:
        return v
    ok = isinstance(v, bool) if kind is bool else (isinstance(v, (int, float)) and not isinstance(v, bool))
    if not ok or (kind is int and v != int(v)):
        raise UserError("%s: field %r = %r is not %s" % (source, key, v, "a boolean" if kind is bool else
                                                           ("an integer" if kind is int else "a number")))
    return kind(v)


def _rope(cfg, family, source):
    """(rope_theta, use_scaled_rope) from v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`."""
    theta = _get(cfg, "rope_theta", source, float, DEFAULT_THETA[family])
    spec, field = cfg.get("rope_scaling"), "rope_scaling"
    if isinstance(cfg.get("rope_parameters"), dict):
        spec, field = cfg["rope_parameters"], "rope_parameters"
        theta = _get(spec, "rope_theta", source + ":rope_parameters", float, theta)
    if not spec:
        return theta, False
    if not isinstance(spec, dict):
        raise UserError("%s: field %r must be an object, got %r" % (source, field, spec))
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return theta, False
    fits = kind == "llama3" and all(float(spec.get(k, -1)) == v for k, v in LLAMA3_ROPE.items() if k != "rope_type")
    if not fits:
        raise UserError("%s: %s %r is not supported (only the default RoPE and Llama-3.1's llama3 scaling %s)"
                        % (source, field, spec, LLAMA3_ROPE))
    return theta, True


def _sliding_window(cfg, family, source):
    """The attention window when some layer really uses one, else None (checked against max_seq_len later)."""
    if family == "mixtral":
        w = cfg.get("sliding_window")
        return int(w) if w else None
    if family == "llama":
        return None
    types = cfg.get("layer_types") or []
    if not isinstance(types, list) or any(t not in ("full_attention", "sliding_attention") for t in types):
        raise UserError("%s: field 'layer_types' = %r: only full_attention/sliding_attention layers exist"
                        % (source, types))
    if cfg.get("use_sliding_window") or "sliding_attention" in types:
        w = cfg.get("sliding_window")
        return int(w) if w else None
    return None


def params_from_hf(cfg, source):
    """config.json dict → (ModelArgs keyword dict, family, sliding window or None)."""
    if not isinstance(cfg, dict):
        raise UserError("%s: expected a JSON object" % source)
    family = family_of(cfg, source)
    unknown = sorted(set(cfg) - _HARMLESS - _COMMON - _OWN[family])
    if unknown:
        raise UserError("%s: field %r of a %s config is not supported (it would be ignored)"
                        % (source, unknown[0], family))
    if float(cfg.get("attention_dropout") or 0.0) != 0.0:
        raise UserError("%s: attention_dropout %r is not supported (attention has no dropout here)"
                        % (source, cfg["attention_dropout"]))
    if cfg.get("mlp_bias"):
        raise UserError("%s: mlp_bias=true is not supported (the FFN projections have no bias)" % source)
    act = cfg.get("hidden_act", "silu")
    if act not in ACTS:
        raise UserError("%s: hidden_act %r is not supported (supported: %s)" % (source, act, ", ".join(ACTS)))
    dim, n_heads = _get(cfg, "hidden_size", source), _get(cfg, "num_attention_heads", source)
    theta, scaled = _rope(cfg, family, source)
    params = dict(dim=dim, n_layers=_get(cfg, "num_hidden_layers", source), n_heads=n_heads,
                  n_kv_heads=_get(cfg, "num_key_value_heads", source, int, None) or n_heads,
                  vocab_size=_get(cfg, "vocab_size", source), norm_eps=_get(cfg, "rms_norm_eps", source, float,
                                                                            DEFAULT_EPS[family]),
                  rope_theta=theta, use_scaled_rope=scaled, hidden_act=ACTS[act],
                  intermediate_size=_get(cfg, "intermediate_size", source),
                  tie_word_embeddings=_get(cfg, "tie_word_embeddings", source, bool, False),
                  head_dim=_get(cfg, "head_dim", source, int, None) or dim // n_heads)
    if family in ("llama", "qwen3"):
        params["attn_bias"] = _get(cfg, "attention_bias", source, bool, False)
    if family == "qwen3":
        params["qk_norm"] = True
    if family == "qwen2_moe":
        params["attn_bias"] = _get(cfg, "qkv_bias", source, bool, True)   # transformers 4 always had the biases
        params["moe"] = _qwen2_moe(cfg, params, source)
    if family == "mixtral":
        params["moe"] = dict(num_experts=_get(cfg, "num_local_experts", source),
                             top_k=_get(cfg, "num_experts_per_tok", source), expert_hidden=params["intermediate_size"],
                             hidden_act=params["hidden_act"], norm_topk_prob=True,
                             aux_switch=_get(cfg, "router_aux_loss_coef", source, float, 0.001),
                             jitter=_get(cfg, "router_jitter_noise", source, float, 0.0))
    return params, family, _sliding_window(cfg, family, source)


def _qwen2_moe(cfg, params, source):
    n_layers, E = params["n_layers"], _get(cfg, "num_experts", source)
    step = _get(cfg, "decoder_sparse_step", source, int, 1)
    only = cfg.get("mlp_only_layers") or []
    if step < 1 or not isinstance(only, list) or not all(isinstance(i, int) for i in only):
        raise UserError("%s: decoder_sparse_step %r / mlp_only_layers %r are not a valid placement"
                        % (source, step, only))
    layers = [i for i in range(n_layers) if i not in only and E > 0 and (i + 1) % step == 0]
    if not layers:
        return None
    shared = _get(cfg, "shared_expert_intermediate_size", source)
    if shared < 1:
        raise UserError("%s: shared_expert_intermediate_size %d: a Qwen2-MoE block always has a shared expert"
                        % (source, shared))
    return dict(num_experts=E, top_k=_get(cfg, "num_experts_per_tok", source), layers=layers,
                expert_hidden=_get(cfg, "moe_intermediate_size", source), hidden_act=params["hidden_act"],
                norm_topk_prob=_get(cfg, "norm_topk_prob", source, bool, False), shared_experts=1,
                shared_hidden=shared, shared_gate=True,
                aux_switch=_get(cfg, "router_aux_loss_coef", source, float, 0.001))


# ------------------------------------------------------------------------------------------------ export
# Training-only settings: they never change the logits, so an export drops them and says so.
_TRAINING_ONLY = ("noisy_gating", "router_dropout", "sample_topk", "aux_seq", "aux_cv2", "aux_mi", "aux_z")


def _expert_width(moe, args, misfit):
    sizes = set(moe.expert_sizes or ()) or {moe.expert_hidden or args.ffn_hidden_dim}
    if len(sizes) > 1:
        misfit.append("moe.expert_sizes=%s (one expert width only)" % list(moe.expert_sizes))
    if moe.experts_per_layer is not None and len(set(moe.experts_per_layer)) > 1:
        misfit.append("moe.experts_per_layer=%s (one expert count only)" % list(moe.experts_per_layer))
    return max(sizes)


def _moe_misfits(moe, family, misfit, notes):
    if moe.router != "linear":
        misfit.append("moe.router=%r (a linear router only)" % moe.router)
    if moe.router_bias:
        misfit.append("moe.router_bias=True (the router has no bias)")
    if moe.scoring != "softmax_topk":
        misfit.append("moe.scoring=%r (softmax then top-k only)" % moe.scoring)
    if moe.capacity_factor or moe.expert_capacity:
        misfit.append("moe capacity (capacity_factor=%g, expert_capacity=%d: no token dropping)"
                      % (moe.capacity_factor, moe.expert_capacity))
    if moe.score_scale != 1.0:
        misfit.append("moe.score_scale=%g (no score scaling)" % moe.score_scale)
    if not moe.gated:
        misfit.append("moe.gated=False (gated experts only)")
    if family == "mixtral" and not moe.norm_topk_prob:
        misfit.append("moe.norm_topk_prob=False (Mixtral always renormalises the top-k weights)")
    if family == "mixtral" and moe.shared_experts:
        misfit.append("moe.shared_experts=%d (Mixtral has no shared experts)" % moe.shared_experts)
    if family == "qwen2_moe" and moe.shared_experts and not moe.shared_gate:
        misfit.append("moe.shared_gate=False (Qwen2-MoE's shared expert always has its sigmoid gate)")
    if family == "qwen2_moe" and moe.jitter:
        notes.append("moe.jitter=%g dropped (training only; Qwen2-MoE has no router jitter)" % moe.jitter)
    notes.extend("moe.%s=%r dropped (training only)" % (k, getattr(moe, k)) for k in _TRAINING_ONLY
                 if getattr(moe, k))
    if moe.aux_switch and moe.aux_switch_form != "mixtral":
        notes.append("moe.aux_switch_form=%r: router_aux_loss_coef is HF's 'mixtral' form" % moe.aux_switch_form)


def hf_config_for(args, family, bos_id=None, eos_id=None):
    """(config.json dict of `family` equivalent to args, notes on dropped training-only settings); a one-line
    UserError listing every field the family cannot express."""
    if family not in FAMILIES:
        raise UserError("--family: %r is not one of %s" % (family, ", ".join(FAMILIES)))
    misfit, notes = [], []
    moe_ids = list(args.moe_layer_ids())
    moe = args.moe if moe_ids else None
    if not args.ffn_gated:
        misfit.append("ffn_gated=False (the FFNs of %s are gated)" % family)
    if args.qk_norm != (family == "qwen3"):
        misfit.append("qk_norm=%s (%s)" % (args.qk_norm, "Qwen3 always normalises q and k" if family == "qwen3"
                                           else "only Qwen3 has q/k norms"))
    if args.attn_bias and family == "mixtral":
        misfit.append("attn_bias=True (Mixtral attention has no biases)")
    if family == "qwen2_moe" and args.head_dim != args.dim // args.n_heads:
        misfit.append("head_dim=%d (Qwen2-MoE uses dim/n_heads = %d)" % (args.head_dim, args.dim // args.n_heads))
    act = args.hidden_act
    if moe is not None:
        dense_left = len(moe_ids) < args.n_layers
        if dense_left and moe.hidden_act != args.hidden_act:
            misfit.append("moe.hidden_act=%r differs from hidden_act=%r (one activation only)"
                          % (moe.hidden_act, args.hidden_act))
        act = moe.hidden_act if not dense_left else act
    if family in ("llama", "qwen3") and moe is not None:
        misfit.append("moe (MoE layers %s: %s has no mixture-of-experts layers)" % (moe_ids, family))
    if family in ("mixtral", "qwen2_moe") and moe is None:
        misfit.append("moe=None (a dense model exports as llama or qwen3)")
    if family == "mixtral" and moe is not None and moe_ids != list(range(args.n_layers)):
        misfit.append("moe placement %s (Mixtral has an MoE block in every layer)" % moe_ids)
    cfg = {"architectures": [FAMILIES[family]], "model_type": family, "hidden_size": args.dim,
           "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
           "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
           "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "hidden_act": HF_ACT[act],
           "rope_scaling": dict(LLAMA3_ROPE) if args.use_scaled_rope else None,
           "max_position_embeddings": 131072 if args.use_scaled_rope else args.max_seq_len,
           "intermediate_size": args.ffn_hidden_dim, "tie_word_embeddings": args.tie_word_embeddings,
           "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32"}
    if bos_id is not None and bos_id >= 0:
        cfg["bos_token_id"] = int(bos_id)
    if eos_id is not None and eos_id >= 0:
        cfg["eos_token_id"] = int(eos_id)
    if family in ("llama", "qwen3"):
        cfg["attention_bias"] = bool(args.attn_bias)   # HF then biases o_proj too: written as zeros
    if family == "llama":
        cfg["mlp_bias"] = False
    if family == "qwen3":
        cfg.update(use_sliding_window=False, sliding_window=None)
    if family == "qwen2_moe":
        cfg.pop("head_dim")
        cfg.update(qkv_bias=True, use_sliding_window=False)   # absent biases are written as zeros
    if moe is not None and family in ("mixtral", "qwen2_moe"):
        _moe_misfits(moe, family, misfit, notes)
        width = _expert_width(moe, args, misfit)
        E = (moe.experts_per_layer or (moe.num_experts,))[0]
        cfg.update(num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.aux_switch)
        if family == "mixtral":
            cfg.update(num_local_experts=E, intermediate_size=width, router_jitter_noise=moe.jitter,
                       sliding_window=None)
        else:
            step, only = _placement(moe_ids, args.n_layers)
            shared = moe.shared_experts * (moe.shared_hidden or moe.expert_hidden or args.ffn_hidden_dim)
            if not moe.shared_experts:
                notes.append("no shared expert: written as a width-1 shared expert with zero weights (exact)")
            cfg.update(num_experts=E, moe_intermediate_size=width, shared_expert_intermediate_size=shared or 1,
                       norm_topk_prob=moe.norm_topk_prob, decoder_sparse_step=step, mlp_only_layers=only)
    if misfit:
        raise UserError("cannot export as %s: %s" % (family, "; ".join(misfit)))
    return cfg, notes


def _placement(moe_ids, n_layers):
    """(decoder_sparse_step, mlp_only_layers) giving exactly these MoE layers (Qwen2-MoE can place any set)."""
    for step in range(1, n_layers + 1):
        if [i for i in range(n_layers) if (i + 1) % step == 0] == moe_ids:
            return step, []
    return 1, [i for i in range(n_layers) if i not in moe_ids]
