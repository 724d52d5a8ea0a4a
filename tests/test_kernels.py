"""Models.kernels: each CPU kernel against numpy (values and gradients), and the whole model with each kernel on and off."""
import numpy as np
import pytest


@pytest.fixture(params=["dnnl", "jt.matmul"])
def path(request, jt):
    from Models import kernels
    saved = kernels._state["ok"]
    if request.param == "dnnl":
        kernels._state["ok"] = None
        if not kernels.dnnl_available():
            if jt.flags.use_cuda:
                pytest.skip("oneDNN kernels do not apply on CUDA")
            pytest.fail("oneDNN is not linked into Jittor (run.sh links Debian's libdnnl)")
    else:
        kernels._state["ok"] = False
    yield request.param
    kernels._state["ok"] = saved


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 7, 4), (1, 1, 16, 9), (2, 33, 8, 1), (9, 6, 5, 7)])  # N, n, m, k
def test_values_and_gradients(jt, path, transpose_b, shape):
    from Models.kernels import batched_matmul
    N, n, m, k = shape
    rng = np.random.default_rng(sum(shape))
    a = rng.standard_normal((N, n, m)).astype(np.float32)
    b = rng.standard_normal((N, k, m) if transpose_b else (N, m, k)).astype(np.float32)
    g = rng.standard_normal((N, n, k)).astype(np.float32)
    bm = b.transpose(0, 2, 1) if transpose_b else b
    av, bv = jt.array(a), jt.array(b)
    c = batched_matmul(av, bv, transpose_b=transpose_b)
    np.testing.assert_allclose(c.numpy(), a @ bm, rtol=1e-5, atol=1e-5)
    da, db = jt.grad((c * jt.array(g)).sum(), [av, bv])
    want_db = a.transpose(0, 2, 1) @ g
    np.testing.assert_allclose(da.numpy(), g @ bm.transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db.numpy(), want_db.transpose(0, 2, 1) if transpose_b else want_db,
                               rtol=1e-5, atol=1e-5)


def test_views_and_no_grad(jt, path):
    """Inputs that are transposed/sliced views, and a no_grad call (generation), give the same numbers."""
    from Models.kernels import batched_matmul
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6, 2, 5)).astype(np.float32)   # [B, S, H, hd]
    v = jt.array(x).transpose(0, 2, 1, 3).reshape(8, 6, 5)[:, :4]  # [B·H, 4, hd]
    want = x.transpose(0, 2, 1, 3).reshape(8, 6, 5)[:, :4]
    with jt.no_grad():
        got = batched_matmul(v, v, transpose_b=True).numpy()
    np.testing.assert_allclose(got, want @ want.transpose(0, 2, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,K,N", [(1, 64, 1000), (3, 100, 257), (8, 48, 33), (13, 512, 4099), (64, 17, 40)])
def test_few_rows_matmul_t_matches_numpy(jt, M, K, N):
    """Row counts that exercise the 8-, 4- and 1-row paths, K not a multiple of 16, N not a multiple of the block."""
    from Models.kernels import few_rows_matmul_t
    rng = np.random.default_rng(M * 1000 + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    with jt.no_grad():
        got = few_rows_matmul_t(jt.array(x), jt.array(w)).numpy()
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)


def test_last_only_logits_equal_full_forward(jt):
    """The decode-time head (few_rows_matmul_t) gives the last-position logits of the ordinary forward."""
    from tiny_variants import build
    model = build("soft_moa", seed=0)
    tokens = jt.array(np.random.default_rng(0).integers(0, model.args.vocab_size, (3, 7)).astype(np.int32))
    with jt.no_grad():
        full = model.llama(tokens).numpy()[:, -1:, :]
        last = model.llama(tokens, last_only=True).numpy()
    np.testing.assert_allclose(last, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("N,rep,T,start", [(3, 2, 5, 0), (2, 4, 1, 7), (1, 1, 9, 3), (2, 3, 16, 0)])
def test_causal_softmax_matches_numpy(jt, N, rep, T, start):
    """Values and gradient of the attention softmax kernel: causal mask with a cache offset, scale, zero rows
    above the diagonal."""
    from Models.kernels import causal_softmax, causal_softmax_available
    S = start + T
    rng = np.random.default_rng(N * 100 + T)
    x = (rng.standard_normal((N, rep * T, S)) * 3).astype(np.float32)
    g = rng.standard_normal((N, rep * T, S)).astype(np.float32)
    scale = 0.37
    xv = jt.array(x)
    if not causal_softmax_available(xv):
        pytest.skip("CPU fp32 kernel not in use")
    p = causal_softmax(xv, T, scale)
    t = np.arange(rep * T) % T
    visible = np.arange(S)[None, :] <= (start + t)[:, None]                # [R, S]
    z = np.where(visible, x.astype(np.float64) * scale, -np.inf)
    want = np.exp(z - z.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(p.numpy(), want, rtol=1e-5, atol=1e-7)
    dx = jt.grad((p * jt.array(g)).sum(), xv).numpy()
    want_dx = scale * want * (g - (g * want).sum(-1, keepdims=True))
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-6)


KERNEL_SWITCHES = ["fused_softmax", "fused_swiglu", "fused_norm", "fused_rope", "fused_head", "dnnl_bmm", "few_rows",
                   "fused_adapters"]


def _model_outputs(jt, model, tokens, params):
    """Training loss + a loss on the logits with the adapter gradients, and the decode path: last-position logits
    of a cached prefill and of one cached decode step (where the few-rows kernels run)."""
    logits = model.llama(tokens)
    loss = model(tokens, tokens)[0] + (logits * logits).mean()
    out = [loss.numpy()] + [g.numpy() for g in jt.grad(loss, params)]
    with jt.no_grad():
        out.append(model.llama(tokens[:, :-1], start_pos=0, use_cache=True, last_only=True).numpy())
        out.append(model.llama(tokens[:, -1:], start_pos=tokens.shape[1] - 1, use_cache=True, last_only=True).numpy())
    model.llama.free_caches()
    return out


@pytest.mark.parametrize("switch", KERNEL_SWITCHES + ["all"])
def test_whole_model_same_with_and_without_each_kernel(jt, switch):
    """The whole model (training loss, a loss on the logits, the adapter gradients, and cached decoding) is the same
    through each CPU kernel and through the Jittor ops it replaces; the "on" pass must really have used the kernel
    (kernel_config.used), so a device where a kernel does not apply cannot pass by comparing the fall-back with
    itself."""
    from Models import kernel_config
    from tiny_variants import build
    if jt.flags.use_cuda:
        pytest.skip("the CPU kernels do not apply on CUDA")
    model = build("soft_moa", seed=0)
    tokens = jt.array(np.random.default_rng(1).integers(0, model.args.vocab_size, (2, 9)).astype(np.int32))
    params = [p for _, p in model.trainable_parameters()]
    fields = KERNEL_SWITCHES if switch == "all" else [switch]
    out = {}
    for on in (True, False):
        before = dict(kernel_config.used)
        with kernel_config.override(**{f: on for f in fields}):
            out[on] = _model_outputs(jt, model, tokens, params)
        for f in fields:
            ran = kernel_config.used[f] - before.get(f, 0)
            assert (ran > 0) if on else (ran == 0), "%s: used %d times with the switch %s" % (f, ran, on)
    for a, b in zip(out[True], out[False]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_kernel_switches_parse_once_from_the_environment():
    from Models.kernel_config import KernelConfig
    from Utils.errors import UserError
    cfg = KernelConfig.from_env({"MOA_FUSED_HEAD": "0", "MOA_FEW_ROWS_KERNEL": "off", "MOA_DNNL_BMM": "yes"})
    assert not cfg.fused_head and not cfg.few_rows and cfg.dnnl_bmm and cfg.fused_norm
    assert not any(vars(KernelConfig.from_env({"MOA_KERNELS": "0"})).values())
    assert KernelConfig.from_env({"MOA_KERNELS": "0", "MOA_FUSED_ROPE": "1"}).fused_rope
    with pytest.raises(UserError, match="MOA_FUSED_NORM"):
        KernelConfig.from_env({"MOA_FUSED_NORM": "maybe"})
    assert all(vars(KernelConfig.from_env({})).values())   # every kernel defaults to on, on every CPU


def test_swiglu_matches_numpy(jt):
    """silu(gate)·up and both gradients, over a size that is not a multiple of the vector width and gates far out
    in both tails of the sigmoid."""
    from Models.kernels import swiglu
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((3, 5, 7)) * 8).astype(np.float32)
    a[0, 0, :4] = [-120.0, -30.0, 30.0, 120.0]
    u = rng.standard_normal((3, 5, 7)).astype(np.float32)
    g = rng.standard_normal((3, 5, 7)).astype(np.float32)
    av, uv = jt.array(a), jt.array(u)
    out = swiglu(av, uv)
    da, du = jt.grad((out * jt.array(g)).sum(), [av, uv])
    a64 = a.astype(np.float64)
    sig = 1.0 / (1.0 + np.exp(-a64))
    np.testing.assert_allclose(out.numpy(), a64 * sig * u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(da.numpy(), g * u * sig * (1 + a64 * (1 - sig)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(du.numpy(), g * a64 * sig, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 200, 300)])   # a tail shorter than the vector; the threaded path
def test_relu_matches_torch_rule(jt, shape):
    """max(x, 0) and its gradient as torch defines them: exactly 0 at x = 0, g where x > 0, and a NaN passed on
    forward; the kernel is what the plain FFN calls."""
    from Models.kernel_config import used
    from Models.kernels import relu
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[:3] = [0.0, -0.0, np.nan]
    g = rng.standard_normal(shape).astype(np.float32)
    before = used["fused_swiglu"]
    xv = jt.array(x)
    out = relu(xv)
    dx = jt.grad((out * jt.array(g)).sum(), xv).numpy()
    assert used["fused_swiglu"] > before
    want = np.where(np.isnan(x), np.nan, np.maximum(x, 0))
    np.testing.assert_array_equal(out.numpy(), want)
    flat_dx, flat_x, flat_g = dx.reshape(-1), x.reshape(-1), g.reshape(-1)
    assert flat_dx[0] == 0 and flat_dx[1] == 0
    np.testing.assert_array_equal(flat_dx[3:], np.where(flat_x[3:] > 0, flat_g[3:], 0))


@pytest.mark.parametrize("weight_trainable", [False, True])
def test_rms_norm_matches_numpy(jt, weight_trainable):
    """RMSNorm through the kernel: value, dx, and dweight when the weight is trainable (pretraining)."""
    from Models.llama import RMSNorm
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((2, 3, 37)) * 2).astype(np.float32)
    w = rng.standard_normal(37).astype(np.float32)
    g = rng.standard_normal((2, 3, 37)).astype(np.float32)
    norm = RMSNorm(37, eps=1e-5)
    norm.weight.assign(jt.array(w))
    if not weight_trainable:
        norm.weight.stop_grad()
    xv = jt.array(x)
    y = norm(xv)
    x64 = x.astype(np.float64)
    r = 1.0 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y.numpy(), x64 * r * w, rtol=1e-5, atol=1e-6)
    loss = (y * jt.array(g)).sum()
    gw = g * w
    want_dx = r * (gw - x64 * r * r * (gw * x64).mean(-1, keepdims=True))
    if weight_trainable:
        dx, dw = jt.grad(loss, [xv, norm.weight])
        np.testing.assert_allclose(dw.numpy(), (g * x64 * r).sum((0, 1)), rtol=1e-4, atol=1e-5)
    else:
        dx = jt.grad(loss, xv)
    np.testing.assert_allclose(dx.numpy(), want_dx, rtol=1e-4, atol=1e-5)


def test_rope_matches_numpy(jt):
    """Interleaved-pair RoPE and its gradient (the rotation by the opposite angle) against numpy."""
    from Models.llama import apply_rotary_emb, precompute_freqs_cis
    rng = np.random.default_rng(9)
    B, T, H, hd = 2, 5, 3, 8
    x = rng.standard_normal((B, T, H, hd)).astype(np.float32)
    g = rng.standard_normal((B, T, H, hd)).astype(np.float32)
    cos, sin = precompute_freqs_cis(hd, 16)
    cos, sin = cos[3:3 + T], sin[3:3 + T]                     # a cache offset
    xv = jt.array(x)
    y = apply_rotary_emb(xv, jt.array(cos), jt.array(sin))
    dx = jt.grad((y * jt.array(g)).sum(), xv)

    def rot(v, s):
        v = v.astype(np.float64).reshape(B, T, H, hd // 2, 2)
        c, sn = cos[None, :, None, :], s * sin[None, :, None, :]
        return np.stack([v[..., 0] * c - v[..., 1] * sn, v[..., 0] * sn + v[..., 1] * c], -1).reshape(B, T, H, hd)
    np.testing.assert_allclose(y.numpy(), rot(x, 1.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx.numpy(), rot(g, -1.0), rtol=1e-5, atol=1e-6)


def test_vectorised_exp_accuracy(jt):
    """moa_exp16, used by the head's softmax and SwiGLU's sigmoid: relative error ≤ 3e-7 (≈ 2.5 ulp; 2.97e-7
    measured) against float64 exp on [−87.3, 0], exactly 0 below, over a grid that fills every vector lane."""
    from Models.kernels import VEC_EXP_HEADER
    x = np.concatenate([np.linspace(-87.3, 0.0, 200001), [-87.4, -100.0, -1e4]]).astype(np.float32)
    src = """
        const int64_t n = in0_shape0;
        for (int64_t i = 0; i < n; i += 16) {
            moa_f16 v = {};
            v = v - 1e30f;
            for (int64_t k = i; k < n && k < i + 16; k++) v[k - i] = in0_p[k];
            const moa_f16 e = moa_exp16(v);
            for (int64_t k = i; k < n && k < i + 16; k++) out0_p[k] = e[k - i];
        }
    """
    got = jt.code(x.shape, "float32", [jt.array(x)], cpu_header=VEC_EXP_HEADER, cpu_src=src).numpy()
    want = np.exp(x.astype(np.float64))
    ok = x >= -87.3
    rel = np.abs(got[ok] - want[ok]) / want[ok]
    assert rel.max() <= 3e-7, rel.max()
    assert (got[~ok] == 0).all()


@pytest.mark.parametrize("M", [1, 5, 8, 13])
def test_decode_projection_kernels_match_numpy(jt, M):
    """Decoding's fused calls: q/k/v against one input (unequal widths, not multiples of the 32-row block) and
    silu(w1 x)·(w3 x); under no_grad on ≤ FEW_ROWS_MAX rows only."""
    from Models.kernels import few_rows_projections, few_rows_swiglu
    rng = np.random.default_rng(M)
    x = rng.standard_normal((M, 1, 40)).astype(np.float32)
    lins = [jt.nn.Linear(40, n, bias=False) for n in (72, 24, 24)]
    w1, w3 = jt.nn.Linear(40, 70, bias=False), jt.nn.Linear(40, 70, bias=False)
    with jt.no_grad():
        outs = few_rows_projections(jt.array(x), lins)
        u = few_rows_swiglu(jt.array(x), w1, w3)
    assert outs is not None and u is not None
    x64 = x.astype(np.float64)
    for o, lin in zip(outs, lins):
        np.testing.assert_allclose(o.numpy(), x64 @ lin.weight.numpy().T, rtol=1e-4, atol=1e-5)
    g, up = x64 @ w1.weight.numpy().T, x64 @ w3.weight.numpy().T
    np.testing.assert_allclose(u.numpy(), g / (1 + np.exp(-g)) * up, rtol=1e-4, atol=1e-5)
    assert few_rows_projections(jt.array(x), lins) is None        # with gradients: the ordinary path
