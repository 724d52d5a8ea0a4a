"""adapter.pth + adapter_params.json (docs/moa.md §5.4–5.5, D11): bit-exact round trips for every variant, config round
trip, reference-style files, routing inference, strict key/shape checking, and interchange with real PyTorch."""
import json
import os
import re

import numpy as np
import pytest

from Models.model_args import ModelArgs
from Utils.errors import UserError

import tiny_variants
from tiny_variants import LORA, TINY

from Utils import checkpoint_io  # noqa: E402
from conftest import require  # noqa: E402

# Every variant of the shared table except the two single-adapter rows, with the sparse and AdaMoLE rows
# configured away from their defaults so the saved config carries non-default values.
VARIANTS = {k: v for k, v in tiny_variants.VARIANTS.items() if k not in ("prompt_only", "pa_only")}
VARIANTS["sparse_moa"] = dict(VARIANTS["sparse_moa"], threshold_grad="ste", max_threshold=0.8)
VARIANTS["adamole_e4"] = dict(LORA, routing="adamole", expert_num=4, noisy_router=True)
SPEC_KEYS = {"w_bias", "lora_layers", "lora_rank", "lora_targets", "lora_alpha", "swi_x", "p_adapter_layers",
             "p_adapter_size", "p_adapter_hydra", "prompt_layers", "prompt_len", "max_seq_len",
             "expert_num", "hydra_moe", "max_threshold", "const_threshold", "noisy_router", "top_k", "adamole",
             "lb_loss_coeff", "routing", "threshold_grad"}
ADAPTER_FIELDS = ("routing", "w_bias", "lora_layers", "lora_rank", "lora_targets", "lora_alpha", "expert_num",
                  "hydra_moe", "prompt_layers", "prompt_len", "p_adapter_layers", "p_adapter_size", "p_adapter_hydra",
                  "swi_x", "max_threshold", "const_threshold", "threshold_grad", "top_k", "lb_loss_coeff",
                  "noisy_router", "max_seq_len")


def build(name, seed, **kw):
    return tiny_variants.build(name, seed, variants=VARIANTS, **kw)


def randomize_adapters(jt, model, seed=0):
    rng = np.random.default_rng(seed)
    for _, p in model.trainable_parameters():
        p.update(jt.array(rng.normal(0, 0.2, p.shape).astype(np.float32)))
        p.sync()


TOKENS = np.random.default_rng(0).integers(1, 1000, size=(2, 8))


# ------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_save_load_bit_exact(jt, tmp_path, name):
    from Models.adapter_io import ADAPTER_FILE, PARAMS_FILE, load_adapter_weights, save_adapter
    model = build(name, 1)
    randomize_adapters(jt, model)
    save_adapter(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([ADAPTER_FILE, PARAMS_FILE])
    stored = checkpoint_io.read_torch_pth(str(tmp_path / ADAPTER_FILE))
    ours = model.adapter_state_dict()
    assert sorted(stored) == sorted(ours)
    assert all(k.startswith("llama.layers.") for k in stored)
    for k, v in ours.items():
        assert stored[k].dtype == np.float32 and np.array_equal(stored[k], v), k
    fresh = build(name, 1)                               # same base, adapters at their init values
    load_adapter_weights(fresh, str(tmp_path / ADAPTER_FILE))
    for k, v in fresh.adapter_state_dict().items():
        assert np.array_equal(v, ours[k]), k
    # a forward right after loading must work and give the saved model's outputs (a noisy router adds fresh
    # N(0,1) noise on every forward, also at inference — docs/moa.md §3.6 — so there only finiteness is checked)
    if model.args.noisy_router:
        assert np.isfinite(fresh.logits(TOKENS)).all()
    else:
        np.testing.assert_array_equal(fresh.logits(TOKENS), model.logits(TOKENS))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_config_round_trip(tmp_path, name, jt):
    from Models.adapter_io import PARAMS_FILE, load_adapter_config, save_adapter
    model = build(name, 1)
    save_adapter(model, str(tmp_path))
    with open(tmp_path / PARAMS_FILE) as f:
        params = json.load(f)
    assert SPEC_KEYS <= set(params), SPEC_KEYS - set(params)
    assert params["routing"] == model.args.routing
    assert params["threshold_grad"] == model.args.threshold_grad
    cfg = load_adapter_config(str(tmp_path))
    again = ModelArgs.create(TINY, cfg)
    for f in ADAPTER_FIELDS:
        assert getattr(again, f) == getattr(model.args, f), f


def test_reference_style_params_accepted(tmp_path, jt):
    """The reference's adapter_params.json carries flash_attention2, bf16 and expert_weight: accepted, ignored."""
    from Models.adapter_io import PARAMS_FILE, load_adapter_config, load_adapter_weights, save_adapter
    model = build("soft_moa", 1)
    randomize_adapters(jt, model)
    save_adapter(model, str(tmp_path))
    with open(tmp_path / PARAMS_FILE) as f:
        params = json.load(f)
    params.update(flash_attention2=False, bf16=True, expert_weight=False)
    with open(tmp_path / PARAMS_FILE, "w") as f:
        json.dump(params, f)
    cfg = load_adapter_config(str(tmp_path))
    for k in ("flash_attention2", "bf16", "expert_weight"):
        assert k not in cfg
    args = ModelArgs.create(TINY, cfg)
    assert args.routing == "soft_moa" and args.lora_targets == model.args.lora_targets
    fresh = build("soft_moa", 2)
    load_adapter_weights(fresh, str(tmp_path))
    for k, v in fresh.adapter_state_dict().items():
        assert np.array_equal(v, model.adapter_state_dict()[k]), k


@pytest.mark.parametrize("name,expected", [
    ("soft_moa", "soft_moa"), ("sparse_moa", "sparse_moa"), ("unipeft", "unipeft"), ("molora_e4", "soft_moe"),
    ("topk_moe_e4_k2", "topk_moe"), ("adamole_e4", "adamole")])
def test_routing_inferred_when_absent(tmp_path, jt, name, expected):
    from Models.adapter_io import PARAMS_FILE, load_adapter_config, save_adapter
    model = build(name, 1)
    save_adapter(model, str(tmp_path))
    with open(tmp_path / PARAMS_FILE) as f:
        params = json.load(f)
    del params["routing"]
    params.pop("adamole")
    with open(tmp_path / PARAMS_FILE, "w") as f:
        json.dump(params, f)
    assert load_adapter_config(str(tmp_path))["routing"] == expected
    # an explicit routing argument wins
    assert load_adapter_config(str(tmp_path), routing="instance_moa")["routing"] == "instance_moa"


# ------------------------------------------------------------------------------------------- strictness
def _saved(jt, tmp_path, name="soft_moa"):
    from Models.adapter_io import save_adapter
    model = build(name, 1)
    save_adapter(model, str(tmp_path))
    return model, checkpoint_io.read_torch_pth(str(tmp_path / "adapter.pth"))


def test_wrong_shape_is_user_error_naming_key(jt, tmp_path):
    from Models.adapter_io import load_adapter_weights
    model, state = _saved(jt, tmp_path)
    key = "llama.layers.1.attention.lora_Q.lora_A.weight"
    assert key in state
    state[key] = np.zeros((state[key].shape[0] + 1, state[key].shape[1]), np.float32)
    checkpoint_io.write_torch_pth(str(tmp_path / "adapter.pth"), state)
    with pytest.raises(UserError, match="lora_Q.lora_A.weight"):
        load_adapter_weights(build("soft_moa", 2), str(tmp_path))


def test_unexpected_tensor_is_user_error_naming_key(jt, tmp_path):
    from Models.adapter_io import load_adapter_weights
    model, state = _saved(jt, tmp_path)
    state["llama.layers.0.attention.lora_Z.lora_A.weight"] = np.zeros((4, 32), np.float32)
    checkpoint_io.write_torch_pth(str(tmp_path / "adapter.pth"), state)
    with pytest.raises(UserError, match="lora_Z"):
        load_adapter_weights(build("soft_moa", 2), str(tmp_path))


def test_missing_tensor_is_user_error_naming_key(jt, tmp_path):
    from Models.adapter_io import load_adapter_weights
    model, state = _saved(jt, tmp_path)
    key = "llama.layers.0.adapter_type_router.w2.bias"
    assert key in state
    del state[key]
    checkpoint_io.write_torch_pth(str(tmp_path / "adapter.pth"), state)
    with pytest.raises(UserError, match="adapter_type_router.w2.bias"):
        load_adapter_weights(build("soft_moa", 2), str(tmp_path))


def test_adapter_for_other_variant_is_rejected(jt, tmp_path):
    from Models.adapter_io import load_adapter_weights, save_adapter
    save_adapter(build("sparse_moa", 1), str(tmp_path))
    with pytest.raises(UserError):
        load_adapter_weights(build("soft_moa", 1), str(tmp_path))


def test_missing_params_json_is_user_error(jt, tmp_path):
    from Models.adapter_io import PARAMS_FILE, load_adapter_config, save_adapter
    save_adapter(build("soft_moe_lora", 1), str(tmp_path))
    os.remove(tmp_path / PARAMS_FILE)
    with pytest.raises(UserError, match=PARAMS_FILE):
        load_adapter_config(str(tmp_path))


# ------------------------------------------------------------------------------------------- real PyTorch
@pytest.mark.parametrize("name", ["soft_moa", "sparse_moa", "topk_moe_e4_k2"])
def test_torch_load_reads_our_file(jt, tmp_path, name):
    torch = require("torch")
    from Models.adapter_io import save_adapter
    model = build(name, 1)
    randomize_adapters(jt, model)
    save_adapter(model, str(tmp_path))
    state = torch.load(str(tmp_path / "adapter.pth"), map_location="cpu", weights_only=True)
    ours = model.adapter_state_dict()
    assert sorted(state) == sorted(ours)
    for k, v in ours.items():
        assert state[k].dtype == torch.float32
        assert np.array_equal(state[k].numpy(), v), k


@pytest.mark.parametrize("name", ["soft_moa", "unipeft", "adamole_e4"])
def test_torch_saved_reference_file_loads(jt, tmp_path, name):
    torch = require("torch")
    from Models.adapter_io import load_adapter_weights
    model = build(name, 1)
    rng = np.random.default_rng(5)
    arrays = {n: rng.normal(0, 0.2, p.shape).astype(np.float32) for n, p in model.trainable_parameters()}
    torch.save({n: torch.from_numpy(a) for n, a in arrays.items()}, str(tmp_path / "adapter.pth"))
    with open(tmp_path / "adapter_params.json", "w") as f:
        json.dump(model.args.adapter_params(), f)
    load_adapter_weights(model, str(tmp_path))
    for n, v in model.adapter_state_dict().items():
        assert np.array_equal(v, arrays[n]), n
    assert np.isfinite(model.logits(TOKENS)).all()
    # bf16 tensors (the reference trains in bf16) load as their exact float32 values
    torch.save({n: torch.from_numpy(a).to(torch.bfloat16) for n, a in arrays.items()}, str(tmp_path / "adapter.pth"))
    load_adapter_weights(model, str(tmp_path))
    for n, v in model.adapter_state_dict().items():
        expect = torch.from_numpy(arrays[n]).to(torch.bfloat16).float().numpy()
        assert np.array_equal(v, expect), n


# ------------------------------------------------------------------------------------------- the reference's sparse_moe
# Module paths of the LoRA targets in the reference's blocks, and the reference's adapter_params.json for sparse_moe
# (docs/moa.md §5.4: the common keys plus noisy_router, top_k, adamole, lb_loss_coeff — no routing, no expert_num).
TARGET_PATHS = {"Q": "attention.lora_Q", "K": "attention.lora_K", "V": "attention.lora_V", "O": "attention.lora_O",
                "FFN_UP": "feed_forward.lora_UP", "FFN_DOWN": "feed_forward.lora_DOWN"}
SPARSE_MOE = dict(TINY, lora_layers="0-2", lora_rank=4, lora_alpha=8, lora_targets="Q,K,V,O,FFN_UP,FFN_DOWN",
                  expert_num=4, top_k=2)


def official_sparse_moe_keys(args, adamole, noisy):
    """{key: shape} of an adapter.pth written by the reference's LLaMA3_sparse_moe, spelled out from its module
    definitions (SparseLoRAMoE: router = NoisyTopkRouter(topkroute_linear[, noise_linear]); AdaMoLE: router,
    threshold_fn[, noise_linear]; both: experts = ModuleList of LoraLayer(lora_A, lora_B)), not from our modules."""
    d, dkv, F = args.dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    dims = {"Q": (d, d), "K": (d, dkv), "V": (d, dkv), "O": (d, d), "FFN_UP": (d, F), "FFN_DOWN": (F, d)}
    E, r = args.expert_num, args.lora_rank
    keys = {}
    for layer in args.lora_layers:
        for t in args.lora_targets:
            n_in, n_out = dims[t]
            p = "llama.layers.%d.%s." % (layer, TARGET_PATHS[t])
            router = p + ("router." if adamole else "router.topkroute_linear.")
            keys.update({router + "weight": (E, n_in), router + "bias": (E,)})
            if adamole:
                keys.update({p + "threshold_fn.weight": (1, n_in), p + "threshold_fn.bias": (1,)})
            if noisy:
                noise = p + ("noise_linear." if adamole else "router.noise_linear.")
                keys.update({noise + "weight": (E, n_in), noise + "bias": (E,)})
            for e in range(E):
                keys[p + "experts.%d.lora_A.weight" % e] = (r, n_in)
                keys[p + "experts.%d.lora_B.weight" % e] = (n_out, r)
    return keys


def official_params(args, adamole, noisy):
    return {"w_bias": False, "lora_layers": "0-2", "lora_rank": args.lora_rank,
            "lora_targets": ",".join(args.lora_targets), "lora_alpha": args.lora_alpha, "swi_x": 0,
            "p_adapter_layers": "0-0", "p_adapter_size": 16, "p_adapter_hydra": False, "prompt_layers": "0-0",
            "prompt_len": 10, "max_seq_len": args.max_seq_len, "flash_attention2": False, "bf16": True,
            "noisy_router": noisy, "top_k": args.top_k, "adamole": adamole, "lb_loss_coeff": 0.0}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A base checkpoint of TINY's shape with the real tokenizer (from_pretrained checks the vocabulary)."""
    from Models.tiny_checkpoint import make_tiny_checkpoint
    d = str(tmp_path_factory.mktemp("sparse_moe_base"))
    make_tiny_checkpoint(d, dim=TINY["dim"], n_layers=TINY["n_layers"], n_heads=TINY["n_heads"],
                         n_kv_heads=TINY["n_kv_heads"], multiple_of=TINY["multiple_of"])
    return d


@pytest.mark.parametrize("adamole,noisy,block_extras", [(False, False, False), (False, True, True),
                                                        (True, False, True), (True, True, False)])
def test_official_sparse_moe_file_loads(jt, tmp_path, tiny_base, adamole, noisy, block_extras):
    """The reference's own key list (issue 13: these files failed with 'unexpected tensor ...lora_K.experts.0...'),
    its adapter_params.json, through from_pretrained: every tensor lands under the same name with the same value."""
    from Models.llama_adapter import LLaMA_adapter
    args = ModelArgs.create(dict(SPARSE_MOE, vocab_size=128256, noisy_router=noisy,
                                 routing="adamole" if adamole else "topk_moe"))
    shapes = official_sparse_moe_keys(args, adamole, noisy)
    rng = np.random.default_rng(11)
    arrays = {k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in shapes.items()}
    stored = dict(arrays)
    if block_extras:  # block-level modules the reference builds but never uses (SPARSE_MOE_UNUSED): ignored
        for layer in args.lora_layers:
            stored["llama.layers.%d.adapter_type_router.weight" % layer] = np.ones((6, args.dim), np.float32)
            stored["llama.layers.%d.adapter_threshold_fn.weight" % layer] = np.ones((1, args.dim), np.float32)
    checkpoint_io.write_torch_pth(str(tmp_path / "adapter.pth"), stored)
    with open(tmp_path / "adapter_params.json", "w") as f:
        json.dump(official_params(args, adamole, noisy), f)
    model = LLaMA_adapter.from_pretrained(tiny_base, adapter_path=str(tmp_path))
    assert model.args.routing == args.routing and model.args.expert_num == 4 and model.args.top_k == 2
    assert model.args.noisy_router == noisy
    ours = model.adapter_state_dict()
    assert sorted(ours) == sorted(arrays)
    for k, v in arrays.items():
        assert np.array_equal(ours[k], v), k
    assert np.isfinite(model.logits(TOKENS)).all()
    # and what we write back is the reference's key list again
    from Models.adapter_io import save_adapter
    save_adapter(model, str(tmp_path / "again"))
    assert sorted(checkpoint_io.read_torch_pth(str(tmp_path / "again" / "adapter.pth"))) == sorted(shapes)


@pytest.mark.parametrize("name", ["topk_moe_e4_k2", "adamole_e4"])
def test_old_files_with_expert_level_still_load(jt, tmp_path, tiny_base, name):
    """Our Top-K / AdaMoLE files written before the modules moved up to lora_X (`lora_X.expert.router...`)."""
    from Models.adapter_io import infer_routing, save_adapter
    from Models.llama_adapter import LLaMA_adapter
    model = build(name, 1, vocab_size=128256)
    randomize_adapters(jt, model, seed=3)
    save_adapter(model, str(tmp_path))
    new = checkpoint_io.read_torch_pth(str(tmp_path / "adapter.pth"))
    old = {re.sub(r"\.(lora_[A-Z]+)\.", r".\1.expert.", k, count=1): v for k, v in new.items()}
    assert all(".expert." in k for k in old) and len(old) == len(new)
    checkpoint_io.write_torch_pth(str(tmp_path / "adapter.pth"), old)
    assert infer_routing(old) == model.args.routing
    loaded = LLaMA_adapter.from_pretrained(tiny_base, adapter_path=str(tmp_path))
    for k, v in loaded.adapter_state_dict().items():
        assert np.array_equal(v, new[k]), k


def test_sparse_moe_modules_sit_at_lora_x(jt):
    """No extra level between the target and the MoE module; SparseMoELoraLayer still builds it."""
    from Models import AdaMoLE, SparseMoELoraLayer, TopKMoE
    model = build("topk_moe_e4_k2", 1)
    assert isinstance(model.llama.layers[0].attention.lora_K, TopKMoE)
    assert isinstance(SparseMoELoraLayer(8, 8, 2, 4, 3, "adamole"), AdaMoLE)
    names = [n for n, _ in model.trainable_parameters()]
    assert "llama.layers.0.attention.lora_K.router.topkroute_linear.weight" in names
    assert "llama.layers.1.feed_forward.lora_DOWN.experts.3.lora_B.weight" in names
    assert not any(".expert." in n for n in names)
