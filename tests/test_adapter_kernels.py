"""Models.adapter_kernels: each decode-time adapter kernel against numpy, where each one declines (gradients, too
many rows, the switch off), and whole models of every adapter variant decoding the same with MOA_FUSED_ADAPTERS on
and off — logits within 1e-5 and identical greedy generations — with the usage counter proving the "on" pass took the
kernels; training never takes them, and the prompt's cached keys / values follow a weight update."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from tiny_variants import VARIANTS, build

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def cpu_only(jt):
    if jt.flags.use_cuda:
        pytest.skip("the adapter kernels are CPU kernels; CUDA takes the generic path")


def _set(jt, var, value):
    var.update(jt.array(np.asarray(value, np.float32)))
    var.sync()


def _rand(jt, rng, var, scale=0.3):
    _set(jt, var, rng.normal(0, scale, var.shape))
    return var.numpy().astype(np.float64)


def _sig(a):
    return 1.0 / (1.0 + np.exp(-a))


def _used():
    from Models import kernel_config
    return kernel_config.used["fused_adapters"]


def _lora(jt, rng, n_in, n_out, rank=4, alpha=8):
    from Models.adapters import MOELoraLayer
    mod = MOELoraLayer(n_in, n_out, rank, alpha)
    a, b = _rand(jt, rng, mod.lora_A.weight), _rand(jt, rng, mod.lora_B.weight)
    return mod, lambda x: (x @ a.T) @ b.T * (alpha / rank)


def _type_route(jt, rng, B, T, names):
    from Models.routing import TypeRoute
    w = rng.uniform(0, 1, (B, T, len(names))).astype(np.float32)
    return TypeRoute(jt.array(w), {n: i for i, n in enumerate(names)}), w.astype(np.float64)


# ------------------------------------------------------------------------------------------- each kernel vs numpy
@pytest.mark.parametrize("swi_x", [0, 2])
@pytest.mark.parametrize("gamma,grad", [(None, None), ("const", "none"), ("learned", "none"), ("learned", "ste"),
                                        ("learned", "shifted")])
def test_type_weights_match_numpy(jt, swi_x, gamma, grad):
    """Router (Linear or SwiGLU) + sigmoid; for sparse MoA Γ (constant or learned), the mask and the masked
    weights of each threshold-gradient mode (ste's forward is w·mask)."""
    from Models.adapter_kernels import type_weights
    from Models.routing import Gamma, make_type_router
    rng = np.random.default_rng(swi_x)
    B, T, d, n = 3, 2, 40, 5
    router = make_type_router(d, n, swi_x)
    block = SimpleNamespace(adapter_type_router=router, threshold_grad=grad or "none")
    x = rng.normal(0, 1, (B, T, d)).astype(np.float32)
    x64 = x.astype(np.float64)
    if swi_x:
        w1, b1, w3, b3, w2, b2 = (_rand(jt, rng, v) for v in (router.w1.weight, router.w1.bias, router.w3.weight,
                                                                 router.w3.bias, router.w2.weight, router.w2.bias))
        g = x64 @ w1.T + b1
        logits = (g * _sig(g) * (x64 @ w3.T + b3)) @ w2.T + b2
    else:
        wr, br = _rand(jt, rng, router.weight), _rand(jt, rng, router.bias)
        logits = x64 @ wr.T + br
    w = _sig(logits)
    if gamma:
        block.adapter_threshold_fn = Gamma(d, 0.5, const=gamma == "const")
        if gamma == "learned":
            gw, gb = _rand(jt, rng, block.adapter_threshold_fn.weight), _rand(jt, rng, block.adapter_threshold_fn.bias)
            gam = 0.5 * _sig(x64 @ gw.T + gb)
        else:
            gam = np.full((B, T, 1), 0.5)
    before = _used()
    with jt.no_grad():
        got = type_weights(block, jt.array(x))
    assert got is not None and _used() == before + 1
    if not gamma:
        assert got[1] is None and got[2] is None
        np.testing.assert_allclose(got[0].numpy(), w, **TOL)
        return
    mask = (w - gam >= 0)
    assert 0 < mask.mean() < 1, "the case must have adapters both on and off"
    np.testing.assert_allclose(got[1].numpy(), gam, **TOL)
    np.testing.assert_array_equal(got[2].numpy(), mask.astype(np.float32))
    want = (w - gam) * mask if grad == "shifted" else w * mask
    np.testing.assert_allclose(got[0].numpy(), want, **TOL)


@pytest.mark.parametrize("B,T,per_sequence", [(1, 1, False), (5, 1, False), (8, 1, False), (3, 4, False),
                                              (13, 1, True), (2, 3, True)])
def test_lora_projections_match_numpy(jt, B, T, per_sequence):
    """q/k/v (unequal widths, not multiples of the 32-row block) with LoRAs on two of them, route weights per token
    or per sequence ([B, 1, n], instance routes): base + (B·A·x)·(α/r)·w."""
    from Models.adapter_kernels import lora_projections
    rng = np.random.default_rng(B * 10 + T)
    x = rng.normal(0, 1, (B, T, 40)).astype(np.float32)
    lins = [jt.nn.Linear(40, n, bias=False) for n in (72, 24, 24)]
    ws = [_rand(jt, rng, lin.weight) for lin in lins]
    lq, fq = _lora(jt, rng, 40, 72)
    lv, fv = _lora(jt, rng, 40, 24, rank=3, alpha=6)
    names = ("lora_Q", "lora_K", "lora_V")
    route, w = _type_route(jt, rng, B, 1 if per_sequence else T, names)
    with jt.no_grad():
        got = lora_projections(jt.array(x), lins, [lq, None, lv], names, route)
    assert got is not None
    x64 = x.astype(np.float64)
    want = [x64 @ ws[0].T + fq(x64) * w[..., 0:1], x64 @ ws[1].T, x64 @ ws[2].T + fv(x64) * w[..., 2:3]]
    for g, e in zip(got, want):
        assert g.shape == e.shape
        np.testing.assert_allclose(g.numpy(), e, **TOL)


@pytest.mark.parametrize("which", ["gate", "up", "both"])
def test_lora_swiglu_matches_numpy(jt, which):
    """silu(w1 x + LoRA_GATE)·(w3 x + LoRA_UP), with no router (weight 1) or a UniPEFT gate per sequence."""
    from Models.adapter_kernels import lora_swiglu
    from Models.llama import NO_ROUTE
    from Models.routing import GateRoute
    rng = np.random.default_rng(len(which))
    B, T, d, N = 3, 2, 40, 70
    x = rng.normal(0, 1, (B, T, d)).astype(np.float32)
    w1, w3 = jt.nn.Linear(d, N, bias=False), jt.nn.Linear(d, N, bias=False)
    a1, a3 = _rand(jt, rng, w1.weight), _rand(jt, rng, w3.weight)
    lg, fg = _lora(jt, rng, d, N) if which != "up" else (None, None)
    lu, fu = _lora(jt, rng, d, N) if which != "gate" else (None, None)
    x64 = x.astype(np.float64)
    for route, gate in ((NO_ROUTE, np.ones((B, 1, 1))), (None, rng.uniform(0, 1, (B, 1, 1)))):
        if route is None:
            route = GateRoute(jt.array(gate.astype(np.float32)), None, None)
        with jt.no_grad():
            got = lora_swiglu(jt.array(x), w1, w3, lg, lu, route)
        g = x64 @ a1.T + (fg(x64) * gate if lg else 0)
        u = x64 @ a3.T + (fu(x64) * gate if lu else 0)
        np.testing.assert_allclose(got.numpy(), g * _sig(g) * u, **TOL)


def test_lora_add_matches_numpy(jt):
    """base + LoRA(x)·w for wo / w2 (the base from oneDNN), K not a multiple of 16."""
    from Models.adapter_kernels import lora_add
    rng = np.random.default_rng(3)
    B, T, K, N = 6, 1, 71, 40
    x = rng.normal(0, 1, (B, T, K)).astype(np.float32)
    base = rng.normal(0, 1, (B, T, N)).astype(np.float32)
    mod, f = _lora(jt, rng, K, N, rank=8, alpha=16)
    route, w = _type_route(jt, rng, B, T, ["lora_O", "lora_DOWN"])
    with jt.no_grad():
        got = lora_add(jt.array(base), mod, jt.array(x), route, "lora_DOWN")
    np.testing.assert_allclose(got.numpy(), base + f(x.astype(np.float64)) * w[..., 1:2], **TOL)


def _numpy_prompt(q, kp, vp, gate, B, H, Hkv, T, hd):
    """The zero-gated prompt attention of Models.adapters.prompt_attention for one prompt expert, [B, H, T, hd]."""
    rep = H // Hkv
    qh = q.reshape(B, Hkv, rep, T, hd).reshape(B, H, T, hd)
    kh = kp.reshape(-1, Hkv, hd).transpose(1, 0, 2)[np.arange(H) // rep]           # [H, P, hd]
    vh = vp.reshape(-1, Hkv, hd).transpose(1, 0, 2)[np.arange(H) // rep]
    s = np.einsum("bhtd,hpd->bhtp", qh, kh) / math.sqrt(hd)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True) * gate.reshape(1, H, 1, 1)
    return np.einsum("bhtp,hpd->bhtd", p, vh)


@pytest.mark.parametrize("B,T", [(4, 1), (2, 5)])
def test_prompt_attention_add_matches_numpy(jt, B, T):
    """output + w · prompt attention: scores against the prompt's keys, own softmax, per-head gate, × values."""
    from Models.adapter_kernels import prompt_attention_add
    from Models.adapters import attach_prompt, prompt_keys_values
    from Models.llama import Attention
    from tiny_variants import make_args
    args = make_args("prompt_only")
    att = Attention(args)
    attach_prompt(att, args)
    rng = np.random.default_rng(B * T)
    H, Hkv, hd = args.n_heads, args.n_kv_heads, args.head_dim
    for v in (att.prompt.weight, att.prompt_gate, att.wk.weight, att.wv.weight):
        _rand(jt, rng, v, 0.5)
    q = rng.normal(0, 1, (B * Hkv, (H // Hkv) * T, hd)).astype(np.float32)
    out = rng.normal(0, 1, (B, H, T, hd)).astype(np.float32)
    route, w = _type_route(jt, rng, B, T, ["lora_Q", "prompt"])
    with jt.no_grad():
        kv = prompt_keys_values(att, "float32")
        got = prompt_attention_add(att, jt.array(q), jt.array(out), kv, route)
        kp, vp = kv[0].numpy().astype(np.float64), kv[1].numpy().astype(np.float64)
    pm = att.prompt.weight.numpy().astype(np.float64)
    np.testing.assert_allclose(kp, pm @ att.wk.weight.numpy().T, **TOL)
    want = out + _numpy_prompt(q.astype(np.float64), kp, vp, att.prompt_gate.numpy(), B, H, Hkv, T, hd) \
        * w[..., 1].reshape(B, 1, T, 1)
    np.testing.assert_allclose(got.numpy(), want, **TOL)


def test_parallel_adapter_add_matches_numpy(jt):
    """h + f + w · (up(silu(down x + b_down)) + b_up)."""
    from Models.adapter_kernels import parallel_adapter_add
    from Models.adapters import PAdapterLayer
    rng = np.random.default_rng(5)
    B, T, d, S = 7, 1, 40, 12
    pa = PAdapterLayer(d, S)
    wd, bd, wu, bu = (_rand(jt, rng, v) for v in (pa.down_proj.weight, pa.down_proj.bias, pa.up_proj.weight,
                                                  pa.up_proj.bias))
    h, f, x = (rng.normal(0, 1, (B, T, d)).astype(np.float32) for _ in range(3))
    route, w = _type_route(jt, rng, B, T, ["lora_Q", "p_adapter"])
    with jt.no_grad():
        got = parallel_adapter_add(jt.array(h), jt.array(f), pa, jt.array(x), route)
    z = x.astype(np.float64) @ wd.T + bd
    np.testing.assert_allclose(got.numpy(), h + f + ((z * _sig(z)) @ wu.T + bu) * w[..., 1:2], **TOL)


def test_kernels_decline_with_gradients_many_rows_or_the_switch_off(jt):
    """Training (gradients), more than FEW_ROWS_MAX rows, the switch off, or a MoLoRA adapter: None (generic path)."""
    from Models import kernel_config
    from Models.adapter_kernels import lora_add, lora_projections
    from Models.adapters import MOELoraLayer
    from Models.kernels import FEW_ROWS_MAX
    from Models.llama import NO_ROUTE
    rng = np.random.default_rng(0)
    lins = [jt.nn.Linear(16, 16, bias=False) for _ in range(3)]
    mod, _ = _lora(jt, rng, 16, 16)
    molora = MOELoraLayer(16, 16, 4, 8, expert_num=2)
    x = jt.array(rng.normal(0, 1, (2, 1, 16)).astype(np.float32))
    names = ("lora_Q", "lora_K", "lora_V")
    before = _used()
    assert lora_projections(x, lins, [mod, None, None], names, NO_ROUTE) is None           # gradients on
    with jt.no_grad():
        big = jt.array(rng.normal(0, 1, (FEW_ROWS_MAX + 1, 1, 16)).astype(np.float32))
        assert lora_projections(big, lins, [mod, None, None], names, NO_ROUTE) is None
        assert lora_projections(x, lins, [None, None, None], names, NO_ROUTE) is None     # no LoRA: few_rows' job
        assert lora_projections(x, lins, [mod, molora, None], names, NO_ROUTE) is None
        assert lora_add(x, molora, x, NO_ROUTE, "lora_O") is None
        with kernel_config.override(fused_adapters=False):
            assert lora_add(x, mod, x, NO_ROUTE, "lora_O") is None
        assert lora_add(x, mod, x, NO_ROUTE, "lora_O") is not None
    assert _used() == before + 1


# ------------------------------------------------------------------------------------------- whole models, on vs off
COVERED = sorted(set(VARIANTS) - {"molora_e4", "hydralora_e4", "pa_moe_hydra_e2", "topk_moe_e4_k2", "adamole_e4"})
FALLBACK = ["molora_e4", "hydralora_e4", "pa_moe_hydra_e2", "topk_moe_e4_k2", "adamole_e4"]


def _randomised(jt, name, seed=0):
    """A tiny model whose adapters all matter: LoRA B, the prompt gate and the routers are not left at their
    zero / near-zero initialisation."""
    model = build(name, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for _, p in model.trainable_parameters():
        _set(jt, p, rng.normal(0, 0.3, p.shape))
    return model.eval()


def _decode(jt, model, tokens):
    """Last-position logits of a cached prefill and two cached decode steps, then a greedy generation (prompts of
    different lengths, so prefill and decode steps mix)."""
    llama, n = model.llama, tokens.shape[1]
    outs = []
    with jt.no_grad():
        outs.append(llama(jt.array(tokens[:, :n - 2]), start_pos=0, use_cache=True, last_only=True).numpy())
        for pos in (n - 2, n - 1):
            outs.append(llama(jt.array(tokens[:, pos:pos + 1]), start_pos=pos, use_cache=True,
                              last_only=True).numpy())
    llama.free_caches()
    prompts = [list(tokens[i, :4 + i]) for i in range(tokens.shape[0])]
    return outs, model.generate(prompts, 8)


@pytest.mark.parametrize("name", COVERED + FALLBACK)
def test_whole_model_decodes_the_same_with_and_without_the_adapter_kernels(jt, name):
    """Every variant: logits within 1e-5 and the same greedy tokens with MOA_FUSED_ADAPTERS on and off; the "on"
    pass must have used the kernels for the variants they cover (and none for MoLoRA / HydraLoRA / MoE-LoRA
    experts and PA experts, which keep the generic path), the "off" pass never."""
    from Models import kernel_config
    model = _randomised(jt, name)
    tokens = np.random.default_rng(7).integers(0, model.args.vocab_size, (3, 10)).astype(np.int32)
    res = {}
    for on in (True, False):
        before = _used()
        with kernel_config.override(fused_adapters=on):
            res[on] = _decode(jt, model, tokens)
        ran = _used() - before
        assert (ran > 0 if on and name in COVERED else ran == 0), "%s: used %d times, switch %s" % (name, ran, on)
    for a, b in zip(res[True][0], res[False][0]):
        np.testing.assert_allclose(a, b, **TOL)
    assert res[True][1] == res[False][1]
    assert all(len(t) == 8 for t in res[True][1])


def test_adapters_change_the_decode(jt):
    """The comparison above is not vacuous: with its adapters switched to zero the same model decodes otherwise."""
    model = _randomised(jt, "soft_moa")
    tokens = np.random.default_rng(7).integers(0, model.args.vocab_size, (3, 10)).astype(np.int32)
    with_adapters = _decode(jt, model, tokens)[0]
    for n, p in model.trainable_parameters():
        if "lora_B" in n or "prompt_gate" in n or "up_proj" in n:
            _set(jt, p, np.zeros(p.shape))
    without = _decode(jt, model, tokens)[0]
    assert all(np.abs(a - b).max() > 1e-2 for a, b in zip(with_adapters, without))


@pytest.mark.parametrize("name", ["sparse_moa", "sparse_moa_const"])
def test_sparse_routing_records_the_same_with_the_kernels(jt, name):
    """Routing dumps while decoding: masked weights, Γ and the active-type counts equal the generic path's, and
    the case has adapters both on and off."""
    from Models import kernel_config
    from Models.moa import get_routing_records, set_routing_record
    model = _randomised(jt, name)
    tokens = np.random.default_rng(3).integers(0, model.args.vocab_size, (4, 6)).astype(np.int32)
    recs = {}
    for on in (True, False):
        set_routing_record(model, True)
        with kernel_config.override(fused_adapters=on), jt.no_grad():
            model.llama(jt.array(tokens[:, :5]), start_pos=0, use_cache=True, last_only=True).sync()
            model.llama(jt.array(tokens[:, 5:]), start_pos=5, use_cache=True, last_only=True).sync()
            recs[on] = get_routing_records(model)
        set_routing_record(model, False)
        model.llama.free_caches()
    active = [recs[True][i]["active"] for i in recs[True]]
    assert any((a > 0).any() for a in active) and any((a < len(recs[True][0]["type"][0, 0])).any() for a in active)
    for i in recs[True]:
        for key in ("type", "threshold", "active"):
            np.testing.assert_allclose(recs[True][i][key], recs[False][i][key], **TOL)


def test_training_never_takes_the_adapter_kernels(jt):
    """A training forward and backward (gradients on) builds no adapter kernel, even on few rows."""
    model = _randomised(jt, "soft_moa").train()
    tokens = jt.array(np.random.default_rng(0).integers(0, model.args.vocab_size, (2, 5)).astype(np.int32))
    before = _used()
    loss = model(tokens, tokens)[0]
    grads = jt.grad(loss, [p for _, p in model.trainable_parameters()])
    jt.sync(grads)
    assert _used() == before


def test_prompt_cache_follows_a_weight_update(jt):
    """The prompt's keys / values are reused within a generation and never across a weight update: train a step
    (prompt table and all), then decode — the same logits as a fresh model holding the updated weights."""
    model = _randomised(jt, "prompt_only")
    tokens = np.random.default_rng(2).integers(0, model.args.vocab_size, (2, 6)).astype(np.int32)
    before = _used()
    first = _decode(jt, model, tokens)
    assert _used() > before
    model.train()
    params = [p for _, p in model.trainable_parameters()]
    grads = jt.grad(model(jt.array(tokens), jt.array(tokens))[0], params)
    for p, g in zip(params, grads):
        _set(jt, p, p.numpy() - 0.5 * g.numpy())
    model.eval()
    after = _decode(jt, model, tokens)
    fresh = build("prompt_only", seed=0)
    state = {n: p.numpy() for n, p in model.named_parameters()}
    for n, p in fresh.named_parameters():
        _set(jt, p, state[n])
    fresh.eval()
    want = _decode(jt, fresh, tokens)
    for a, b in zip(after[0], want[0]):
        np.testing.assert_array_equal(a, b)
    assert after[1] == want[1]
    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(first[0], after[0]))   # the update did change them


def test_prompt_cache_is_rebuilt_by_every_generation(jt):
    """Without train() or free_caches(): a prompt-table update between two generations is seen by the second, as
    every start_pos 0 forward computes the keys / values anew."""
    model = _randomised(jt, "prompt_only")
    tokens = np.random.default_rng(4).integers(0, model.args.vocab_size, (2, 6)).astype(np.int32)
    with jt.no_grad():
        model.llama(jt.array(tokens[:, :4]), start_pos=0, use_cache=True, last_only=True).sync()
        stale = model.llama.layers[0].attention._prompt_kv
        assert stale is not None
        model.llama(jt.array(tokens[:, 4:5]), start_pos=4, use_cache=True, last_only=True).sync()
        assert model.llama.layers[0].attention._prompt_kv is stale          # reused by the decode step
        table = model.llama.layers[0].attention.prompt.weight
        _set(jt, table, table.numpy() * -1.0)
        got = model.llama(jt.array(tokens[:, :4]), start_pos=0, use_cache=True, last_only=True).numpy()
        assert model.llama.layers[0].attention._prompt_kv is not stale
        from Models import kernel_config
        with kernel_config.override(fused_adapters=False):
            want = model.llama(jt.array(tokens[:, :4]), start_pos=0, use_cache=True, last_only=True).numpy()
    model.llama.free_caches()
    assert model.llama.layers[0].attention._prompt_kv is None
    np.testing.assert_allclose(got, want, **TOL)
