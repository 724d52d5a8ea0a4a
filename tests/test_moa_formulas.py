"""Every adapter / routing formula of docs/moa.md §2–§3 (and D1, D2) against an independent numpy computation that reads
the
module's own weights; plus gradient-flow checks of the sparse-MoA threshold modes."""
import math

import numpy as np
import pytest

from Models.model_args import ModelArgs

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=32, max_seq_len=64)
ATOL = 1e-5


# ------------------------------------------------------------------------------------------- numpy references
def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_silu(x):
    return x * np_sigmoid(x)


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def W(layer):
    return layer.weight.numpy().astype(np.float64)


def Bias(layer):
    return layer.bias.numpy().astype(np.float64)


def np_linear(x, layer):
    y = x @ W(layer).T
    if getattr(layer, "bias", None) is not None:
        y = y + Bias(layer)
    return y


def assign(jt, var, value):
    """Set a parameter in place. The sync matters: Jittor 1.3.11 fails to compile a fused kernel that broadcasts an
    un-executed `array` op of shape [1] (e.g. a Linear(d→1) bias), so the new value is materialised at once."""
    var.update(jt.array(np.asarray(value, dtype=np.float32)))
    var.sync()


def randomize(jt, var, scale=0.3, rng=None):
    assign(jt, var, rng.normal(0, scale, var.shape))


def tiny(**kw):
    merged = dict(TINY)
    merged.update(kw)
    return ModelArgs(**merged)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seed(jt):
    from Utils.runtime import seed_everything
    seed_everything(7)


# ------------------------------------------------------------------------------------------- LoRA family
def test_lora_scaling_alpha_over_r(jt, rng):
    from Models.adapters import MOELoraLayer
    layer = MOELoraLayer(16, 12, rank=4, alpha=8)
    assert np.all(layer.lora_B.weight.numpy() == 0)
    assert layer.lora_A.bias is None and layer.lora_B.bias is None
    bound = 1 / math.sqrt(16)
    A = layer.lora_A.weight.numpy()
    assert np.abs(A).max() <= bound and np.abs(A).max() > 0.5 * bound
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    assert np.all(layer(jt.array(x)).numpy() == 0)  # B = 0 ⇒ no effect at init
    randomize(jt, layer.lora_B.weight, rng=rng)
    out = layer(jt.array(x)).numpy()
    ref = (8 / 4) * (x @ W(layer.lora_A).T @ W(layer.lora_B).T)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("hydra", [False, True])
def test_molora_and_hydralora(jt, rng, hydra):
    from Models.adapters import MOELoraLayer
    E, r, alpha = 3, 4, 16
    layer = MOELoraLayer(16, 12, rank=r, alpha=alpha, expert_num=E, hydra=hydra)
    names = [n for n, _ in layer.named_parameters()]
    assert layer.router.bias is None and "router.bias" not in names
    if hydra:  # the shared A is literally one parameter
        assert [n for n in names if "lora_A" in n] == ["lora_A.weight"]
    else:
        assert sorted(n for n in names if "lora_A" in n) == ["lora_A_l.%d.weight" % e for e in range(E)]
    assert sorted(n for n in names if "lora_B" in n) == ["lora_B_l.%d.weight" % e for e in range(E)]
    for e in range(E):
        assert np.all(layer.lora_B_l[e].weight.numpy() == 0)
        randomize(jt, layer.lora_B_l[e].weight, rng=rng)
    layer._record = True
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    out = layer(jt.array(x)).numpy()
    g = np_softmax(x @ W(layer.router).T)
    ref = 0
    for e in range(E):
        A = W(layer.lora_A) if hydra else W(layer.lora_A_l[e])
        ref = ref + g[..., e:e + 1] * (alpha / r) * (x @ A.T @ W(layer.lora_B_l[e]).T)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(layer._last_weights.numpy(), g, atol=1e-6)


def test_hydra_flag_ignored_for_one_expert(jt):
    from Models.adapters import MOELoraLayer
    layer = MOELoraLayer(16, 12, rank=4, alpha=8, expert_num=1, hydra=True)
    assert sorted(n for n, _ in layer.named_parameters()) == ["lora_A.weight", "lora_B.weight"]


# ------------------------------------------------------------------------------------------- parallel adapter
@pytest.mark.parametrize("E,hydra", [(1, False), (3, True), (3, False)])
def test_parallel_adapter(jt, rng, E, hydra):
    from Models.adapters import PAdapterLayer
    d, S = 24, 8
    pa = PAdapterLayer(d, S, expert_num=E, hydra=hydra)
    bound = 1e-4 * math.sqrt(6 / (d + S))
    downs = [pa.down_proj] if (E == 1 or hydra) else list(pa.down_proj_l)
    ups = [pa.up_proj] if E == 1 else list(pa.up_proj_l)
    assert len(downs) == (1 if (E == 1 or hydra) else E) and len(ups) == E
    for lin in downs + ups:
        w = lin.weight.numpy()
        assert np.abs(w).max() <= bound * (1 + 1e-6)
        assert np.abs(w).max() > 0.3 * bound
        assert np.all(lin.bias.numpy() == 0)
    if E > 1:  # router Linear(d→E) with (default-initialised) bias
        assert pa.router.bias is not None and np.any(pa.router.bias.numpy() != 0)
    for lin in downs + ups:
        randomize(jt, lin.weight, rng=rng)
        randomize(jt, lin.bias, rng=rng)
    x = rng.normal(size=(2, 5, d)).astype(np.float32)
    out = pa(jt.array(x)).numpy()
    if E == 1:
        ref = np_linear(np_silu(np_linear(x, pa.down_proj)), pa.up_proj)
    else:
        g = np_softmax(np_linear(x, pa.router))
        ref = 0
        for e in range(E):
            down = pa.down_proj if hydra else pa.down_proj_l[e]
            ref = ref + g[..., e:e + 1] * np_linear(np_silu(np_linear(x, down)), pa.up_proj_l[e])
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=1e-5)


# ------------------------------------------------------------------------------------------- prompt adapter
def _prompt_attention_setup(jt, E):
    from Models.adapters import attach_prompt
    from Models.llama import Attention
    args = tiny(routing="soft_moe", prompt_layers="0-2", prompt_len=3, expert_num=E)
    att = Attention(args)
    attach_prompt(att, args)
    return args, att


@pytest.mark.parametrize("E", [1, 3])
def test_prompt_attention_against_numpy(jt, rng, E):
    from Models.adapters import prompt_attention
    args, att = _prompt_attention_setup(jt, E)
    P, H, Hkv, hd, d = 3, 4, 2, 8, 32
    assert tuple(att.prompt.weight.shape) == (E * P, d)
    assert tuple(att.prompt_gate.shape) == (1, H, 1, 1) and np.all(att.prompt_gate.numpy() == 0)
    assert (att.prompt_router is not None) == (E > 1)
    B, T = 2, 5
    q = rng.normal(size=(B, H, T, hd)).astype(np.float32)
    x = rng.normal(size=(B, T, d)).astype(np.float32)
    qg = jt.array(q.reshape(B * Hkv, (H // Hkv) * T, hd))  # grouped by KV head, as Attention.execute passes it
    # zero gate ⇒ exactly zero output
    assert np.all(prompt_attention(att, qg, jt.array(x)).numpy() == 0)
    gate = rng.normal(size=(1, H, 1, 1)).astype(np.float32)
    assign(jt, att.prompt_gate, gate)
    out = prompt_attention(att, qg, jt.array(x)).numpy()

    pm = att.prompt.weight.numpy().astype(np.float64)
    kp = (pm @ W(att.wk).T).reshape(E * P, Hkv, hd)
    vp = (pm @ W(att.wv).T).reshape(E * P, Hkv, hd)
    ref = np.zeros((B, H, T, hd))
    g = np_softmax(np_linear(x, att.prompt_router)) if E > 1 else None
    for h in range(H):
        kv = h // (H // Hkv)  # repeated KV heads: query head h reads KV head h // n_rep
        s = q[:, h] @ kp[:, kv].T / math.sqrt(hd)                       # [B, T, E·P]
        p = np_softmax(s) * gate[0, h, 0, 0]                             # joint softmax over all E·P slots
        if E == 1:
            ref[:, h] = p @ vp[:, kv]
        else:
            for e in range(E):
                o_e = p[..., e * P:(e + 1) * P] @ vp[e * P:(e + 1) * P, kv]
                ref[:, h] += g[..., e:e + 1] * o_e
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=1e-4)


# ------------------------------------------------------------------------------------------- routers and threshold
def test_swiglu_router(jt, rng):
    from Models.routing import Router, make_type_router
    d, n, s = 32, 7, 4
    router = make_type_router(d, n, s)
    assert isinstance(router, Router)
    assert tuple(router.w1.weight.shape) == (s * n, d) and tuple(router.w2.weight.shape) == (n, s * n)
    for lin in (router.w1, router.w2, router.w3):
        assert np.all(lin.bias.numpy() == 0)
        assert np.any(lin.weight.numpy() != 0)
    x = rng.normal(size=(2, 5, d)).astype(np.float32)
    ref = np_linear(np_silu(np_linear(x, router.w1)) * np_linear(x, router.w3), router.w2)
    np.testing.assert_allclose(router(jt.array(x)).numpy(), ref, atol=ATOL, rtol=1e-5)


def test_linear_router(jt, rng):
    from Models.routing import make_type_router
    router = make_type_router(32, 6, 0)
    assert tuple(router.weight.shape) == (6, 32) and router.bias is not None
    assert np.any(router.bias.numpy() != 0)  # default init, bias not zeroed
    x = rng.normal(size=(2, 5, 32)).astype(np.float32)
    np.testing.assert_allclose(router(jt.array(x)).numpy(), np_linear(x, router), atol=ATOL, rtol=1e-5)


def test_gamma_learned_and_const(jt, rng):
    from Models.routing import Gamma
    g = Gamma(32, 0.8)
    x = rng.normal(size=(2, 5, 32)).astype(np.float32)
    out = g(jt.array(x)).numpy()
    assert out.shape == (2, 5, 1)
    ref = 0.8 * np_sigmoid(x @ g.weight.numpy().T.astype(np.float64) + g.bias.numpy())
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert np.all((out > 0) & (out <= 0.8))
    c = Gamma(32, 0.5, const=True)
    assert list(c.named_parameters()) == []
    outc = c(jt.array(x)).numpy()
    assert outc.shape == (2, 5, 1) and np.all(outc == np.float32(0.5))


@pytest.mark.parametrize("mode", ["none", "ste", "shifted"])
def test_masked_weights_forward_values_and_tie(jt, mode):
    from Models.routing import masked_weights
    w = np.array([[[0.10, 0.25, 0.40, 0.90]], [[0.30, 0.25, 0.24999, 0.26]]], np.float32)   # [2, 1, 4]
    gamma = np.full((2, 1, 1), 0.25, np.float32)
    wm, m = masked_weights(jt.array(w), jt.array(gamma), mode)
    m = m.numpy().astype(bool)
    expected_mask = w >= gamma                       # ≥: the tie w == Γ is selected
    assert np.array_equal(m, expected_mask)
    assert m[0, 0, 1] and m[1, 0, 1] and not m[1, 0, 2]
    ref = (w - gamma) * expected_mask if mode == "shifted" else w * expected_mask
    np.testing.assert_allclose(wm.numpy(), ref, atol=1e-7)


# ------------------------------------------------------------------------------------------- sparse MoE-LoRA
def _randomize_experts(jt, mod, rng):
    for ex in mod.experts:
        randomize(jt, ex.lora_B.weight, rng=rng)


def test_topk_renormalisation_k2_of_4(jt, rng):
    from Models.adapters import TopKMoE
    E, k, r, alpha = 4, 2, 4, 8
    mod = TopKMoE(16, 12, r, alpha, E, k, noisy=False)
    _randomize_experts(jt, mod, rng)
    randomize(jt, mod.router.topkroute_linear.weight, scale=1.0, rng=rng)
    mod._record = True
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    out = mod(jt.array(x)).numpy()
    flat = x.reshape(-1, 16)
    p = np_softmax(np_linear(flat, mod.router.topkroute_linear))
    top = np.argsort(-p, axis=-1)[:, :k]
    w = np.zeros_like(p)
    np.put_along_axis(w, top, np.take_along_axis(p, top, -1), -1)
    w = w / w.sum(-1, keepdims=True)
    ref = 0
    for e in range(E):
        ex = mod.experts[e]
        ref = ref + w[:, e:e + 1] * (alpha / r) * (flat @ W(ex.lora_A).T @ W(ex.lora_B).T)
    np.testing.assert_allclose(out.reshape(-1, 12), ref, atol=ATOL, rtol=1e-5)
    rec = mod._last_weights.numpy()
    assert rec.shape == (2, 5, E)
    np.testing.assert_allclose(rec.reshape(-1, E), w, atol=1e-6)
    assert np.all((rec > 0).sum(-1) == k)
    # load-balance loss from the module's own router output (Switch style)
    counts = (w > 0).sum(0)
    lb_ref = E * np.sum(counts / flat.shape[0] * p.sum(0) / flat.shape[0])
    assert mod._lb_loss is not None
    np.testing.assert_allclose(mod._lb_loss.numpy(), lb_ref, rtol=1e-5)


def test_adamole_weights(jt, rng):
    from Models.adapters import AdaMoLE
    E, r, alpha = 4, 4, 8
    mod = AdaMoLE(16, 12, r, alpha, E, noisy=False)
    _randomize_experts(jt, mod, rng)
    randomize(jt, mod.router.weight, scale=1.0, rng=rng)
    randomize(jt, mod.threshold_fn.weight, scale=1.0, rng=rng)
    mod._record = True
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    out = mod(jt.array(x)).numpy()
    flat = x.reshape(-1, 16)
    g = np_softmax(np_linear(flat, mod.router))
    tau = np_sigmoid(np_linear(flat, mod.threshold_fn)) / E
    a = g - tau
    m = a >= 0
    w = a * m
    s = w.sum(-1, keepdims=True)
    w = w / np.where(s == 0, 1, s)
    ref = 0
    for e in range(E):
        ex = mod.experts[e]
        ref = ref + w[:, e:e + 1] * (alpha / r) * (flat @ W(ex.lora_A).T @ W(ex.lora_B).T)
    np.testing.assert_allclose(out.reshape(-1, 12), ref, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(mod._last_weights.numpy().reshape(-1, E), w, atol=1e-6)
    lb_ref = E * np.sum(m.sum(0) / flat.shape[0] * a.sum(0) / flat.shape[0])
    np.testing.assert_allclose(mod._lb_loss.numpy(), lb_ref, rtol=1e-4, atol=1e-7)


def test_adamole_all_zero_row_divides_by_one(jt, rng):
    """Uniform g = 1/E and τ = σ(100)/E = 1/E exactly ⇒ a = 0 everywhere: weights 0, output 0, no NaN."""
    from Models.adapters import AdaMoLE
    E = 4
    mod = AdaMoLE(16, 12, 4, 8, E, noisy=False)
    _randomize_experts(jt, mod, rng)
    assign(jt, mod.router.weight, np.zeros((E, 16)))
    assign(jt, mod.router.bias, np.zeros((E,)))
    assign(jt, mod.threshold_fn.weight, np.zeros((1, 16)))
    assign(jt, mod.threshold_fn.bias, np.array([100.0], np.float32))
    mod._record = True
    out = mod(jt.array(rng.normal(size=(2, 5, 16)).astype(np.float32))).numpy()
    assert np.isfinite(out).all() and np.all(out == 0)
    assert np.all(mod._last_weights.numpy() == 0)


def test_adamole_weights_with_a_denormal_sum(jt):
    """A row whose Σ w is a float32 denormal (< FLT_MIN) is divided by 1, never by the denormal: under flush-to-
    zero that divisor can act as 0 and give inf/NaN. Rows with normal sums are renormalised as before."""
    from Models.adapters import FLT_MIN, adamole_weights
    # Built from bits: once Jittor has run, this process flushes denormals (np.float32(1e-39) would already be 0).
    tiny = 713623                                                       # ≈ 1e-39: zero exponent, non-zero mantissa
    g = np.array([[tiny, 0, 0, 0], [tiny, tiny, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], np.uint32).view(np.float32)
    g[2] = [0.4, 0.3, 0.2, 0.1]
    assert g.view(np.uint32)[0, 0] == tiny
    tau = np.array([[0], [0], [0.25], [0]], np.float32)
    w = adamole_weights(jt.array(g), jt.array(tau))[0].numpy()
    a = g.astype(np.float64) - tau
    wm = a * (a >= 0)
    s = wm.sum(-1, keepdims=True)
    ref = wm / np.where(np.abs(s) < FLT_MIN, 1.0, s)
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w, ref, rtol=1e-6, atol=1e-30)            # 1e-39 or a flushed 0 both pass
    np.testing.assert_allclose(w[2], [0.15 / 0.20, 0.05 / 0.20, 0, 0], rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_load_balance_perfect_balance_and_collapse(jt, rng, k):
    from Models.adapters import TopKMoE
    E = 4
    x = jt.array(rng.normal(size=(2, 5, 16)).astype(np.float32))
    mod = TopKMoE(16, 12, 4, 8, E, k, noisy=False)
    lin = mod.router.topkroute_linear
    # uniform router ⇒ p = 1/E for every token ⇒ lb = E·Σ_e (count_e/N)(1/E) = Σ_e count_e / N = k
    assign(jt, lin.weight, np.zeros((E, 16)))
    assign(jt, lin.bias, np.zeros((E,)))
    mod(x)
    np.testing.assert_allclose(mod._lb_loss.numpy(), k, rtol=1e-6)
    # collapse: every token to expert 0 with p ≈ 1 ⇒ lb ≈ E·1·1 = E (k=2 adds the tiny p of the 2nd choice)
    assign(jt, lin.bias, np.array([40.0, 0, 0, 0], np.float32))
    mod(x)
    p = np_softmax(np.broadcast_to(np.array([40.0, 0, 0, 0]), (10, E)))
    counts = np.zeros(E)
    counts[0] = 10
    if k == 2:
        counts[1] = 10  # ties among the three 0-logit experts: which one is picked does not change lb (equal p)
    lb_ref = E * np.sum(counts / 10 * p.sum(0) / 10)
    np.testing.assert_allclose(mod._lb_loss.numpy(), lb_ref, rtol=1e-6)
    np.testing.assert_allclose(lb_ref, E, rtol=1e-6)
    # not in training mode ⇒ no loss is computed
    mod.eval()
    mod._lb_loss = None
    mod(x)
    assert mod._lb_loss is None


# ------------------------------------------------------------------------------------------- sparse route
@pytest.mark.parametrize("case", ["partial", "none", "all"])
def test_sparse_route_equals_dense(jt, rng, case):
    from Models.adapters import MOELoraLayer, PAdapterLayer
    from Models.routing import SparseTypeRoute, TypeRoute, masked_weights
    B, T, D, n = 2, 5, 16, 2
    lora = MOELoraLayer(D, 12, 4, 8)
    randomize(jt, lora.lora_B.weight, rng=rng)
    pa = PAdapterLayer(D, 8)
    randomize(jt, pa.up_proj.weight, rng=rng)
    randomize(jt, pa.down_proj.weight, rng=rng)
    w = rng.uniform(0.05, 0.95, size=(B, T, n)).astype(np.float32)
    gamma = {"partial": 0.5, "none": 0.99, "all": 0.01}[case]
    if case == "partial":
        w[0, 0] = 0.9
        w[1, 1] = 0.1
    wm, mask = masked_weights(jt.array(w), jt.array(np.full((B, T, 1), gamma, np.float32)), "none")
    cols = {"lora_Q": 0, "p_adapter": 1}
    sparse, dense = SparseTypeRoute(wm, cols, mask), TypeRoute(wm, cols)
    x = jt.array(rng.normal(size=(B, T, D)).astype(np.float32))
    for name, mod in (("lora_Q", lora), ("p_adapter", pa)):
        d = dense.apply(name, mod, x).numpy()
        s = sparse.apply(name, mod, x)
        if case == "none":
            assert s is None or np.all(s.numpy() == 0)
            assert np.all(d == 0)
            continue
        s = s.numpy()
        assert s.shape == d.shape
        np.testing.assert_allclose(s, d, atol=1e-6, rtol=1e-5)
        sel = w[..., cols[name]] >= gamma
        assert np.all(s[~sel] == 0)
        if case == "partial":
            assert sel.any() and not sel.all()


# ------------------------------------------------------------------------------------------- whole blocks
FULL_TARGETS = "Q,K,V,O,FFN_UP,FFN_GATE,FFN_DOWN"
ORDER = ["lora_Q", "lora_K", "lora_V", "prompt", "lora_O", "lora_UP", "lora_GATE", "lora_DOWN", "p_adapter"]


def _activate_all_adapters(jt, model, rng):
    """Make every adapter contribute: LoRA B random, prompt gate random, PA weights larger."""
    for name, p in model.trainable_parameters():
        if "lora_B" in name or name.endswith("prompt_gate") or ("p_adapter" in name and "gate" not in name):
            randomize(jt, p, scale=0.3, rng=rng)


def _zero_adapter(jt, block, t):
    if t == "prompt":
        assign(jt, block.attention.prompt_gate, np.zeros(block.attention.prompt_gate.shape))
    elif t == "p_adapter":
        for lin in (block.p_adapter.up_proj,):
            assign(jt, lin.weight, np.zeros(lin.weight.shape))
            assign(jt, lin.bias, np.zeros(lin.bias.shape))
    else:
        owner = block.attention if t in ("lora_Q", "lora_K", "lora_V", "lora_O") else block.feed_forward
        B = getattr(owner, t).lora_B.weight
        assign(jt, B, np.zeros(B.shape))


def _soft_moa_model(jt, rng, routing="soft_moa", targets=FULL_TARGETS):
    from Models.llama_adapter import LLaMA_adapter
    from Utils.runtime import seed_everything
    seed_everything(11)
    args = tiny(routing=routing, lora_layers="0-2", lora_rank=4, lora_alpha=8, lora_targets=targets,
                prompt_layers="0-2", prompt_len=3, p_adapter_layers="0-2", p_adapter_size=8, swi_x=0)
    model = LLaMA_adapter(args)
    _activate_all_adapters(jt, model, rng)
    return model


def _np_block(block, x, cos, sin, args, w):
    """Independent numpy forward of one soft-MoA block with every adapter; w: [B, T, 9] type weights."""
    B, T, d = x.shape
    H, Hkv, hd = args.n_heads, args.n_kv_heads, args.head_dim
    att, ff = block.attention, block.feed_forward
    col = {t: w[..., i:i + 1] for i, t in enumerate(ORDER)}

    def rms(v, norm):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + args.norm_eps) * norm.weight.numpy()

    def lora(mod, v):
        return mod.scaling * (v @ W(mod.lora_A).T @ W(mod.lora_B).T)

    def rope(v):  # v [B, T, h, hd]; interleaved pairs
        v0, v1 = v[..., 0::2], v[..., 1::2]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        out = np.empty_like(v)
        out[..., 0::2] = v0 * c - v1 * s
        out[..., 1::2] = v0 * s + v1 * c
        return out

    xn = rms(x, block.attention_norm)
    q = xn @ W(att.wq).T + col["lora_Q"] * lora(att.lora_Q, xn)
    k = xn @ W(att.wk).T + col["lora_K"] * lora(att.lora_K, xn)
    v = xn @ W(att.wv).T + col["lora_V"] * lora(att.lora_V, xn)
    q = rope(q.reshape(B, T, H, hd)).transpose(0, 2, 1, 3)
    k = rope(k.reshape(B, T, Hkv, hd))
    v = v.reshape(B, T, Hkv, hd)
    pm = att.prompt.weight.numpy().astype(np.float64)
    kp = (pm @ W(att.wk).T).reshape(-1, Hkv, hd)
    vp = (pm @ W(att.wv).T).reshape(-1, Hkv, hd)
    gate = att.prompt_gate.numpy().reshape(H)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    o = np.zeros((B, H, T, hd))
    for h in range(H):
        kv = h // (H // Hkv)
        s = q[:, h] @ k[:, :, kv].transpose(0, 2, 1) / math.sqrt(hd) + causal
        o[:, h] = np_softmax(s) @ v[:, :, kv]
        sp = np_softmax(q[:, h] @ kp[:, kv].T / math.sqrt(hd)) * gate[h]
        o[:, h] += col["prompt"] * (sp @ vp[:, kv])
    a = o.transpose(0, 2, 1, 3).reshape(B, T, H * hd)
    h_ = x + a @ W(att.wo).T + col["lora_O"] * lora(att.lora_O, a)
    hn = rms(h_, block.ffn_norm)
    g = hn @ W(ff.w1).T + col["lora_GATE"] * lora(ff.lora_GATE, hn)
    up = hn @ W(ff.w3).T + col["lora_UP"] * lora(ff.lora_UP, hn)
    u = np_silu(g) * up
    ffn = u @ W(ff.w2).T + col["lora_DOWN"] * lora(ff.lora_DOWN, u)
    pa = block.p_adapter
    pa_out = np_linear(np_silu(np_linear(hn, pa.down_proj)), pa.up_proj)
    return h_ + ffn + col["p_adapter"] * pa_out


def test_soft_moa_block_against_numpy(jt, rng):
    model = _soft_moa_model(jt, rng)
    args = model.args
    block = model.llama.layers[0]
    assert block.type_columns == {t: i for i, t in enumerate(ORDER)}
    B, T = 2, 6
    x = rng.normal(size=(B, T, args.dim)).astype(np.float32)
    cos, sin = model.llama._cos_np[:T], model.llama._sin_np[:T]
    from Models.llama import causal_mask
    with jt.no_grad():
        out = block(jt.array(x), 0, jt.array(cos), jt.array(sin), causal_mask(T, 0)).numpy()
    w = np_sigmoid(np_linear(x.astype(np.float64), block.adapter_type_router))       # σ(router(x)) on the raw x
    ref = _np_block(block, x.astype(np.float64), cos, sin, args, w)
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=1e-4)
    # and the type weights really matter: with all weights 1 the numpy block differs
    assert np.abs(_np_block(block, x.astype(np.float64), cos, sin, args, np.ones_like(w)) - ref).max() > 1e-3


@pytest.mark.parametrize("col", range(len(ORDER)))
def test_soft_moa_router_column_removes_exactly_its_adapter(jt, rng, col):
    """Bias −1e4 on column c ⇒ σ = 0 ⇒ logits equal those of the model with adapter c zeroed (columns in the
    fixed order [Q, K, V, Prompt, O, UP, GATE, DOWN, PA])."""
    model = _soft_moa_model(jt, rng)
    tokens = rng.integers(0, 1000, size=(2, 6))
    t = ORDER[col]
    ref_full = model.logits(tokens)
    saved = {n: p.numpy().copy() for n, p in model.trainable_parameters()}
    for block in model.llama.layers:
        b = block.adapter_type_router.bias.numpy().copy()
        b[col] = -1e4
        assign(jt, block.adapter_type_router.bias, b)
    removed_by_router = model.logits(tokens)
    params = dict(model.trainable_parameters())
    for n, v in saved.items():
        if "adapter_type_router" in n:
            assign(jt, params[n], v)
    for block in model.llama.layers:
        _zero_adapter(jt, block, t)
    removed_by_zeroing = model.logits(tokens)
    assert np.abs(removed_by_router - ref_full).max() > 1e-6   # the adapter did have an effect
    np.testing.assert_allclose(removed_by_router, removed_by_zeroing, atol=1e-5, rtol=1e-5)


def test_unipeft_gates_from_sequence_mean_and_pa_uses_p_adapter_gate(jt, rng):
    from Models.llama_adapter import LLaMA_adapter
    from Models.moa import get_routing_records, set_routing_record
    from Models.routing import GateRoute, build_route
    from Utils.runtime import seed_everything
    seed_everything(3)
    args = tiny(routing="unipeft", lora_layers="0-2", lora_rank=4, lora_targets="Q,K,V,O,FFN_DOWN",
                prompt_layers="0-2", prompt_len=3, p_adapter_layers="0-2", p_adapter_size=8)
    model = LLaMA_adapter(args)
    _activate_all_adapters(jt, model, rng)
    block = model.llama.layers[0]
    tokens = rng.integers(0, 1000, size=(2, 6))
    emb = model.llama.tok_embeddings.weight.numpy().astype(np.float64)[tokens]       # block-0 input
    m = emb.mean(1, keepdims=True)
    gates = [np_sigmoid(np_linear(m, g)) for g in (block.lora_gate, block.prompt_gate, block.p_adapter_gate)]
    route = build_route(block, jt.array(emb.astype(np.float32)), 0)
    assert isinstance(route, GateRoute)
    np.testing.assert_allclose(route.g["lora"].numpy(), gates[0], atol=1e-6)
    np.testing.assert_allclose(route.g["prompt"].numpy(), gates[1], atol=1e-6)
    np.testing.assert_allclose(route.g["p_adapter"].numpy(), gates[2], atol=1e-6)   # D2: not the prompt gate
    assert np.abs(gates[2] - gates[1]).max() > 1e-4
    set_routing_record(model, True)
    model.logits(tokens)
    rec = get_routing_records(model)[0]["type"]
    assert rec.shape == (2, 1, 3)
    np.testing.assert_allclose(rec, np.concatenate(gates, -1), atol=1e-6)
    set_routing_record(model, False)
    # behaviourally: p_adapter_gate bias −1e4 removes exactly the PA; prompt_gate bias does not touch the PA
    full = model.logits(tokens)
    for b in model.llama.layers:
        assign(jt, b.p_adapter_gate.bias, np.array([-1e4], np.float32))
    no_pa_by_gate = model.logits(tokens)
    for b in model.llama.layers:
        _zero_adapter(jt, b, "p_adapter")
    no_pa = model.logits(tokens)
    assert np.abs(full - no_pa).max() > 1e-6
    np.testing.assert_allclose(no_pa_by_gate, no_pa, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- gradients (D1)
def _sparse_model(jt, rng, threshold_grad, bias_by_col=None):
    from Models.llama_adapter import LLaMA_adapter
    from Utils.runtime import seed_everything
    seed_everything(5)
    args = tiny(routing="sparse_moa", lora_layers="0-2", lora_rank=4, lora_targets="Q,V,FFN_DOWN",
                p_adapter_layers="0-2", p_adapter_size=8, swi_x=0, threshold_grad=threshold_grad)
    model = LLaMA_adapter(args)
    _activate_all_adapters(jt, model, np.random.default_rng(99))
    if bias_by_col:
        for block in model.llama.layers:
            b = block.adapter_type_router.bias.numpy().copy()
            for c, v in bias_by_col.items():
                b[c] = v
            assign(jt, block.adapter_type_router.bias, b)
    return model


def _loss_and_grads(jt, model, tokens):
    labels = tokens.copy()
    labels[:, :2] = -100
    loss = model(jt.array(tokens.astype(np.int32)), jt.array(labels.astype(np.int32)))[0]
    names, params = zip(*model.trainable_parameters())
    grads = jt.grad(loss, list(params))
    return float(loss.item()), {n: g.numpy() for n, g in zip(names, grads)}


def test_threshold_grad_none_gamma_and_unselected_types_get_no_gradient(jt, rng):
    tokens = rng.integers(0, 1000, size=(2, 8))
    # columns: [lora_Q, lora_V, lora_DOWN, p_adapter]; Q never selected (σ(−1e4)=0 < Γ), V always (σ(1e4)=1 ≥ Γ)
    model = _sparse_model(jt, rng, "none", {0: -1e4, 1: 1e4})
    assert model.llama.layers[0].type_columns == {"lora_Q": 0, "lora_V": 1, "lora_DOWN": 2, "p_adapter": 3}
    loss, grads = _loss_and_grads(jt, model, tokens)
    assert np.isfinite(loss)
    thr = [n for n in grads if "adapter_threshold_fn" in n]
    assert len(thr) == 4
    for n in thr:
        assert np.all(grads[n] == 0), n
    for n in grads:
        if ".lora_Q." in n:
            assert np.all(grads[n] == 0), n
        if ".lora_V." in n:
            assert np.abs(grads[n]).max() > 0, n


def test_threshold_grad_ste_same_forward_and_gamma_gets_gradient(jt, rng):
    tokens = rng.integers(0, 1000, size=(2, 8))
    loss_none, _ = _loss_and_grads(jt, _sparse_model(jt, rng, "none"), tokens)
    loss_ste, grads = _loss_and_grads(jt, _sparse_model(jt, rng, "ste"), tokens)
    assert loss_ste == pytest.approx(loss_none, rel=1e-6, abs=1e-6)
    thr = [n for n in grads if "adapter_threshold_fn" in n]
    assert thr and all(np.abs(grads[n]).max() > 0 for n in thr)
    loss_shift, grads_s = _loss_and_grads(jt, _sparse_model(jt, rng, "shifted"), tokens)
    assert abs(loss_shift - loss_none) > 1e-6
    assert all(np.abs(grads_s[n]).max() > 0 for n in thr)
