"""Trainable-parameter counts (docs/moa.md §4): the closed forms of `count_trainable_params` against every number
docs/moa.md §4.3
gives for LLaMA-3.1-8B, and against the element count of a really built (tiny) model for every variant; D12."""
import numpy as np
import pytest

from Models.model_args import ModelArgs

BASE_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
               ffn_dim_multiplier=1.3)
ALL = "0-32"
QKVOD = "Q,K,V,O,FFN_DOWN"
MOA = dict(lora_layers=ALL, lora_rank=8, lora_alpha=8, lora_targets=QKVOD, prompt_layers=ALL, prompt_len=10,
           p_adapter_layers=ALL, p_adapter_size=16)
SPARSE = dict(MOA, prompt_layers="0-0")
LORA8 = dict(lora_layers=ALL, lora_rank=8, lora_alpha=8, lora_targets=QKVOD)


def cfg(**kw):
    merged = dict(BASE_8B)
    merged.update(kw)
    return ModelArgs(**merged)


def count(**kw):
    from Models.moa import count_trainable_params
    return count_trainable_params(cfg(**kw))


# (id, ModelArgs overrides, docs/moa.md §4.3 number)
TABLE_8B = [
    ("soft_moa_paper", dict(MOA, routing="soft_moa", swi_x=4), 24_520_288),
    ("soft_moa_swi0", dict(MOA, routing="soft_moa", swi_x=0), 18_089_696),
    ("soft_moa_no_prompt", dict(MOA, routing="soft_moa", swi_x=4, prompt_layers="0-0"), 22_158_016),
    ("soft_moa_qkvo_up_down", dict(MOA, routing="soft_moa", swi_x=4, lora_targets="Q,K,V,O,FFN_UP,FFN_DOWN"),
     30_289_664),
    ("instance_moa", dict(MOA, routing="instance_moa", swi_x=4), 24_520_288),
    ("sparse_moa_paper", dict(SPARSE, routing="sparse_moa", swi_x=4), 22_289_120),
    ("sparse_moa_prompt", dict(MOA, routing="sparse_moa", swi_x=4), 24_651_392),
    ("sparse_moa_swi0", dict(SPARSE, routing="sparse_moa", swi_x=0), 16_777_952),
    ("unipeft", dict(MOA, routing="unipeft"), 17_565_280),
    ("lora_r16", dict(LORA8, routing="soft_moe", lora_rank=16, lora_alpha=16), 23_068_672),
    ("lora_r8", dict(LORA8, routing="soft_moe"), 11_534_336),
    ("molora_e8", dict(LORA8, routing="soft_moe", expert_num=8), 100_139_008),
    ("hydralora_e8", dict(LORA8, routing="soft_moe", expert_num=8, hydra_moe=True), 45_088_768),
    ("topk_e8_k2", dict(LORA8, routing="topk_moe", expert_num=8, top_k=2, noisy_router=False), 100_140_288),
    ("adamole_e8", dict(LORA8, routing="adamole", expert_num=8, noisy_router=False), 101_123_488),
    ("prompt_only", dict(routing="soft_moe", prompt_layers=ALL, prompt_len=10), 1_311_744),
    ("pa_only", dict(routing="soft_moe", p_adapter_layers=ALL, p_adapter_size=16), 4_325_888),
    ("prompt_moe_e8", dict(routing="soft_moe", prompt_layers=ALL, prompt_len=10, expert_num=8), 11_535_616),
    ("pa_moe_e8_hydra", dict(routing="soft_moe", p_adapter_layers=ALL, p_adapter_size=16, expert_num=8,
                             p_adapter_hydra=True), 20_972_288),
    # "Other expert counts" line
    ("molora_e2", dict(LORA8, routing="soft_moe", expert_num=2), 25_034_752),
    ("molora_e4", dict(LORA8, routing="soft_moe", expert_num=4), 50_069_504),
    ("hydralora_e2", dict(LORA8, routing="soft_moe", expert_num=2, hydra_moe=True), 17_170_432),
    ("hydralora_e4", dict(LORA8, routing="soft_moe", expert_num=4, hydra_moe=True), 26_476_544),
    ("topk_e2", dict(LORA8, routing="topk_moe", expert_num=2, top_k=2), 25_035_072),
    ("topk_e4", dict(LORA8, routing="topk_moe", expert_num=4, top_k=2), 50_070_144),
    ("adamole_e2", dict(LORA8, routing="adamole", expert_num=2), 26_018_272),
    ("adamole_e4", dict(LORA8, routing="adamole", expert_num=4), 51_053_344),
    # per-layer building blocks, as one-layer configurations of the 8B dimensions
    ("block_lora_q", dict(routing="soft_moe", n_layers=1, lora_layers="0-1", lora_rank=8, lora_targets="Q"), 65_536),
    ("block_lora_k", dict(routing="soft_moe", n_layers=1, lora_layers="0-1", lora_rank=8, lora_targets="K"), 40_960),
    ("block_lora_v", dict(routing="soft_moe", n_layers=1, lora_layers="0-1", lora_rank=8, lora_targets="V"), 40_960),
    ("block_lora_o", dict(routing="soft_moe", n_layers=1, lora_layers="0-1", lora_rank=8, lora_targets="O"), 65_536),
    ("block_lora_up", dict(routing="soft_moe", n_layers=1, lora_layers="0-1", lora_rank=8, lora_targets="FFN_UP"),
     147_456),
    ("block_lora_down", dict(routing="soft_moe", n_layers=1, lora_layers="0-1", lora_rank=8,
                             lora_targets="FFN_DOWN"), 147_456),
    # FFN_GATE only exists in soft/sparse MoA: sparse MoA with a constant threshold and a linear router over n=1
    # adds d+1 = 4,097 router parameters to the 147,456 of the LoRA.
    ("block_lora_gate_plus_linear_router_n1", dict(routing="sparse_moa", n_layers=1, lora_layers="0-1", lora_rank=8,
                                                   lora_targets="FFN_GATE", const_threshold=True, swi_x=0),
     147_456 + 4_097),
    ("block_qkvod", dict(routing="soft_moe", n_layers=1, lora_layers="0-1", lora_rank=8, lora_targets=QKVOD),
     360_448),
    ("block_prompt_p10", dict(routing="soft_moe", n_layers=1, prompt_layers="0-1", prompt_len=10), 40_992),
    ("block_pa_s16", dict(routing="soft_moe", n_layers=1, p_adapter_layers="0-1", p_adapter_size=16), 135_184),
    ("block_soft_moa_layer", dict(MOA, routing="soft_moa", swi_x=4, n_layers=1, lora_layers="0-1",
                                  prompt_layers="0-1", p_adapter_layers="0-1"), 766_259),
    ("block_sparse_moa_layer", dict(SPARSE, routing="sparse_moa", swi_x=4, n_layers=1, lora_layers="0-1",
                                    p_adapter_layers="0-1"), 696_535),
]


@pytest.mark.parametrize("overrides,expected", [pytest.param(o, e, id=i) for i, o, e in TABLE_8B])
def test_8b_counts_match_spec_table(overrides, expected):
    assert count(**overrides) == expected


def _one_layer(routing, **kw):
    base = dict(MOA, routing=routing, n_layers=1, lora_layers="0-1", prompt_layers="0-1", p_adapter_layers="0-1")
    base.update(kw)
    return base


@pytest.mark.parametrize("n,swi_x,expected", [
    (7, 4, 229_635), (6, 4, 196_806), (7, 0, 28_679), (6, 0, 24_582)])
def test_8b_type_router_building_blocks(n, swi_x, expected):
    """Router size = soft MoA layer count minus the same adapters without a router (soft_moe, E=1)."""
    prompt = "0-1" if n == 7 else "0-0"
    with_router = count(**_one_layer("soft_moa", swi_x=swi_x, prompt_layers=prompt))
    without = count(**_one_layer("soft_moe", prompt_layers=prompt))
    assert with_router - without == expected
    if swi_x == 4:  # w1 / w3 114,716 each and w2 203 for n = 7
        s = swi_x * n
        assert (4096 * s + s, s * n + n) == ((114_716, 203) if n == 7 else (4096 * 24 + 24, 24 * 6 + 6))


def test_8b_threshold_and_gate_building_blocks():
    learned = count(**dict(SPARSE, routing="sparse_moa", swi_x=4))
    const = count(**dict(SPARSE, routing="sparse_moa", swi_x=4, const_threshold=True))
    assert learned - const == 131_104 == 32 * 4_097
    # UniPEFT's three gates: 3·(d+1) per layer, one third of them the p_adapter_gate (131,104 in all).
    unipeft = count(**dict(MOA, routing="unipeft"))
    plain = count(**dict(MOA, routing="soft_moe"))
    assert unipeft - plain == 3 * 131_104


def test_8b_base_size_and_fraction():
    a = cfg()
    assert a.ffn_hidden_dim == 14336
    d, L, V, F, dkv = a.dim, a.n_layers, a.vocab_size, a.ffn_hidden_dim, a.n_kv_heads * a.head_dim
    base = 2 * V * d + L * (2 * d * d + 2 * d * dkv + 3 * d * F + 2 * d) + d
    assert base == 8_030_261_248
    assert round(100 * count(**dict(MOA, routing="soft_moa", swi_x=4)) / base, 3) == 0.305


# ------------------------------------------------------------------------------------------- tiny, built models
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=32, max_seq_len=64)
T_ALL = "0-2"
T_MOA = dict(lora_layers=T_ALL, lora_rank=4, lora_alpha=8, prompt_layers=T_ALL, prompt_len=3,
             p_adapter_layers=T_ALL, p_adapter_size=8)
T_LORA = dict(lora_layers=T_ALL, lora_rank=4, lora_alpha=8, lora_targets="Q,K,V,O,FFN_UP,FFN_DOWN")
TINY_VARIANTS = [
    ("soft_moa", dict(T_MOA, routing="soft_moa", swi_x=2, lora_targets="Q,K,V,O,FFN_UP,FFN_GATE,FFN_DOWN")),
    ("soft_moa_swi0_e2", dict(T_MOA, routing="soft_moa", swi_x=0, lora_targets=QKVOD, expert_num=2)),
    ("soft_moa_partial_layers", dict(T_MOA, routing="soft_moa", swi_x=2, lora_targets=QKVOD, lora_layers="0-1",
                                     prompt_layers="1-2", p_adapter_layers="0-0")),
    ("sparse_moa", dict(T_MOA, routing="sparse_moa", swi_x=2, lora_targets=QKVOD, prompt_layers="0-0")),
    ("sparse_moa_prompt_gate", dict(T_MOA, routing="sparse_moa", swi_x=0, lora_targets="Q,FFN_GATE,FFN_DOWN")),
    ("sparse_moa_const", dict(T_MOA, routing="sparse_moa", swi_x=0, lora_targets=QKVOD, const_threshold=True)),
    ("instance_moa", dict(T_MOA, routing="instance_moa", swi_x=2, lora_targets="Q,K,V,O,FFN_UP,FFN_DOWN")),
    ("unipeft", dict(T_MOA, routing="unipeft", lora_targets=QKVOD)),
    ("lora", dict(T_LORA, routing="soft_moe")),
    ("molora_e4", dict(T_LORA, routing="soft_moe", expert_num=4)),
    ("hydralora_e4", dict(T_LORA, routing="soft_moe", expert_num=4, hydra_moe=True)),
    ("prompt_only", dict(routing="soft_moe", prompt_layers=T_ALL, prompt_len=3)),
    ("prompt_moe_e2", dict(routing="soft_moe", prompt_layers=T_ALL, prompt_len=3, expert_num=2)),
    ("pa_only", dict(routing="soft_moe", p_adapter_layers=T_ALL, p_adapter_size=8)),
    ("pa_moe_hydra_e3", dict(routing="soft_moe", p_adapter_layers=T_ALL, p_adapter_size=8, expert_num=3,
                             p_adapter_hydra=True)),
    ("pa_moe_e3", dict(routing="soft_moe", p_adapter_layers=T_ALL, p_adapter_size=8, expert_num=3)),
    ("topk_e4_k2", dict(T_LORA, routing="topk_moe", expert_num=4, top_k=2)),
    ("topk_e4_noisy", dict(T_LORA, routing="topk_moe", expert_num=4, top_k=2, noisy_router=True)),
    ("adamole_e4", dict(T_LORA, routing="adamole", expert_num=4)),
    ("adamole_e3_noisy", dict(T_LORA, routing="adamole", expert_num=3, noisy_router=True)),
]


def tiny(**kw):
    merged = dict(TINY)
    merged.update(kw)
    return ModelArgs(**merged)


@pytest.mark.parametrize("overrides", [pytest.param(o, id=i) for i, o in TINY_VARIANTS])
def test_tiny_built_model_matches_analytic_count(jt, overrides):
    from Models.llama_adapter import LLaMA_adapter
    from Models.moa import count_trainable_params
    args = tiny(**overrides)
    model = LLaMA_adapter(args)
    trainable = model.trainable_parameters()
    n_elems = sum(int(np.prod(p.shape)) for _, p in trainable)
    assert n_elems == count_trainable_params(args)
    assert model.num_trainable_params() == n_elems
    all_names = [n for n, _ in model.named_parameters()]
    expected = sorted(n for n in all_names if any(k in n for k in ("lora", "prompt", "adapter")))
    names = [n for n, _ in trainable]
    assert sorted(names) == expected
    assert len(set(names)) == len(names)
    # the base is frozen, the adapters are not
    for n, p in model.named_parameters():
        assert p.is_stop_grad() == (n not in set(names)), n
    assert all(str(p.dtype) == "float32" for _, p in trainable)


@pytest.mark.parametrize("routing", ["soft_moa", "sparse_moa", "instance_moa"])
def test_block_without_adapters_has_no_router(jt, routing):
    """D12: lora_layers '0-1' of 2 layers → layer 1 builds no router, no threshold (no zero-width Linear)."""
    from Models.llama_adapter import LLaMA_adapter
    from Models.moa import count_trainable_params
    args = tiny(routing=routing, lora_layers="0-1", lora_rank=4, lora_targets="Q,V", swi_x=0)
    model = LLaMA_adapter(args)
    b0, b1 = model.llama.layers[0], model.llama.layers[1]
    assert getattr(b0, "adapter_type_router", None) is not None
    assert getattr(b1, "adapter_type_router", None) is None
    assert getattr(b1, "adapter_threshold_fn", None) is None
    assert b1.routing_kind is None
    assert not any(n.startswith("llama.layers.1.") for n, _ in model.trainable_parameters())
    assert count_trainable_params(args) == 4 * (32 + 32) + 4 * (32 + 16) + (32 * 2 + 2) + (33 if routing == "sparse_moa" else 0)
    out = model.logits(np.arange(8).reshape(1, 8))
    assert np.isfinite(out).all()


# ------------------------------------------------------------------------------------------- base counts (issue 15 §2)
BASE = dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=100, intermediate_size=48, max_seq_len=16)
MOE4 = dict(num_experts=4, top_k=2, expert_hidden=16)
BASES = {
    "dense": {},
    "dense_tied": dict(tie_word_embeddings=True),
    "qwen3_like": dict(qk_norm=True, head_dim=16, attn_bias=True, tie_word_embeddings=True),
    "plain_relu_ffn": dict(ffn_gated=False, hidden_act="relu"),
    "mixtral_like": dict(moe=MOE4),
    "qwen2_moe_like": dict(attn_bias=True, moe=dict(MOE4, layers=[1], shared_experts=1, shared_hidden=24,
                                                    shared_gate=True)),
    "two_shared_no_gate": dict(moe=dict(MOE4, shared_experts=2, layer_freq=2)),
    "experts_per_layer": dict(moe=dict(MOE4, experts_per_layer=[2, 4, 6])),
    "expert_sizes_mlp_router": dict(moe=dict(MOE4, expert_sizes=[8, 16, 24, 40], router="mlp", router_bias=True,
                                             router_hidden=12)),
    "gmm_noisy_plain": dict(moe=dict(MOE4, router="gmm", router_hidden=8, noisy_gating=True, gated=False,
                                     hidden_act="gelu")),
    "moe_tied_qk_norm": dict(tie_word_embeddings=True, qk_norm=True, moe=dict(MOE4, start_layer=1)),
}


@pytest.mark.parametrize("name", sorted(BASES))
def test_base_count_is_the_built_models(jt, name):
    """param_shapes is every parameter of a built Transformer (names and shapes); count_params its sum."""
    from Models.llama import Transformer
    from Models.param_count import count_params, param_shapes
    args = ModelArgs(**dict(BASE, **BASES[name]))
    built = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    shapes = param_shapes(args)
    assert built == shapes
    counts = count_params(args)
    assert counts["total"] == sum(int(np.prod(s)) for s in built.values())
    if args.moe is None:
        assert counts["active"] == counts["total"]


def test_active_counts_by_hand():
    from Models.param_count import count_params
    mixtral = ModelArgs(**dict(BASE, moe=MOE4))
    c = count_params(mixtral)
    assert c["total"] - c["active"] == 3 * (3 * 32 * (4 * 16 - 2 * 16))          # 2 of 4 experts idle, 3 layers
    sizes = ModelArgs(**dict(BASE, moe=dict(MOE4, expert_sizes=[8, 16, 24, 40], noisy_gating=True)))
    c = count_params(sizes)
    assert c["total"] - c["active"] == 3 * (3 * 32 * (88 - (24 + 40)) + 4 * 32)  # the 2 widest run; noise is idle


# ------------------------------------------------------------------------------------------- Qwen3-8B (issue 19)
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
            "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128,
            "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
            "max_position_embeddings": 40960, "max_window_layers": 36, "num_attention_heads": 32,
            "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
            "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
QWEN3_MOA = dict(lora_layers="0-36", lora_rank=8, lora_alpha=8, lora_targets=QKVOD, p_adapter_layers="0-36",
                 p_adapter_size=16)


@pytest.mark.parametrize("overrides,expected", [
    (dict(QWEN3_MOA, routing="soft_moa", swi_x=4), 24_337_944),
    (dict(QWEN3_MOA, routing="sparse_moa", swi_x=4), 24_485_436),
    (dict(QWEN3_MOA, routing="soft_moa", swi_x=0), 18_137_880),
    (dict(lora_layers="0-36", lora_rank=8, lora_alpha=8, lora_targets=QKVOD, routing="soft_moe"), 12_386_304),
], ids=["soft_moa", "sparse_moa", "soft_moa_swi0", "lora_r8"])
def test_qwen3_8b_counts_from_its_config(tmp_path, overrides, expected):
    """No weights: Qwen3-8B's config.json → ModelArgs → closed forms (documented in the README beside LLaMA-3.1-8B)."""
    import json
    from Models.param_count import count_params
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN3_8B))
    args = ModelArgs.from_hf_config(str(path), **overrides)
    assert (args.qk_norm, args.head_dim, args.rope_theta, args.tie_word_embeddings) == (True, 128, 1e6, False)
    counts = count_params(args)
    assert counts["total"] == counts["active"] == 8_190_735_360          # transformers' count for Qwen3-8B
    assert counts["adapters"] == expected
    r, d, q, kv, F = 8, 4096, 32 * 128, 8 * 128, 12288                    # the LoRA row by hand (H·hd = 4096 here)
    if overrides["routing"] == "soft_moe":
        assert expected == 36 * r * ((d + q) + 2 * (d + kv) + (q + d) + (F + d))


@pytest.mark.parametrize("routing", ["soft_moa", "sparse_moa", "topk_moe"])
def test_adapter_count_with_head_dim_apart(jt, routing):
    """Qwen3-0.6B-like shapes (H·head_dim = 2·dim): LoRA on Q and O spans H·head_dim; built count = closed form."""
    from Models.llama_adapter import LLaMA_adapter
    from Models.moa import count_trainable_params
    from Models.param_count import count_params
    extra = dict(expert_num=2, top_k=1) if routing == "topk_moe" else dict(swi_x=2)
    args = ModelArgs(**dict(BASE, head_dim=16, qk_norm=True, tie_word_embeddings=True, routing=routing,
                            lora_layers="0-3", lora_rank=4, lora_targets="Q,K,V,O,FFN_DOWN", p_adapter_layers="0-3",
                            **extra))
    model = LLaMA_adapter(args)
    if routing != "topk_moe":
        assert model.llama.layers[0].attention.lora_Q.lora_B.weight.shape[0] == 4 * 16   # H·head_dim, not dim 32
    assert model.num_trainable_params() == count_trainable_params(args) == count_params(args)["adapters"]


@pytest.mark.parametrize("name", ["soft_moa", "sparse_moa", "soft_moe_lora"])
def test_w_bias_trains_norms_too_and_the_count_says_so(jt, name):
    """The reference's w_bias: norm weights (and base biases) join the trainable set; the closed form follows."""
    from Models.moa import count_trainable_params
    from tiny_variants import build
    model = build(name, 0, w_bias=True)
    names = [n for n, _ in model.trainable_parameters()]
    assert any(n.endswith("attention_norm.weight") for n in names) and "llama.norm.weight" in names
    assert model.num_trainable_params() == count_trainable_params(model.args)
    plain = build(name, 0)
    d, L = model.args.dim, model.args.n_layers
    assert model.num_trainable_params() - plain.num_trainable_params() == (2 * L + 1) * d
