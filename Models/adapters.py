"""Adapter experts of MoA (docs/moa.md §2, §3.6): LoRA / MoLoRA / HydraLoRA, parallel adapter, zero-gated prompt, and
the
sparse MoE-LoRA forms (Top-K, AdaMoLE) with their load-balance loss.

One interface: `delta = adapter(x)`; the block's route decides how the delta is weighted. Attribute names follow
the reference (`lora_A`, `lora_B_l.{e}`, `down_proj`, `router.topkroute_linear`, `experts.{e}.lora_A`, ...) so
adapter files move between the two implementations without renaming.
"""
import math

from Models.kernel_config import enabled, note_used
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn


# ---------------------------------------------------------------------------- initialisers (torch semantics)
def linear(in_features, out_features, bias=True, init="default"):
    """nn.Linear initialised as torch would: default = Kaiming-uniform(a=√5) ≡ U(±1/√in) for weight and bias;
    'zeros' for LoRA B; ('xavier', gain) for the parallel adapter; biases zero unless default."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    bound = 1.0 / math.sqrt(in_features)
    if init == "default":
        layer.weight = jt.init.uniform((out_features, in_features), "float32", -bound, bound)
        if bias:
            layer.bias = jt.init.uniform((out_features,), "float32", -bound, bound)
    elif init == "zeros":
        layer.weight = jt.zeros((out_features, in_features), "float32")
        if bias:
            layer.bias = jt.zeros((out_features,), "float32")
    elif isinstance(init, tuple) and init[0] == "xavier":
        xb = init[1] * math.sqrt(6.0 / (in_features + out_features))
        layer.weight = jt.init.uniform((out_features, in_features), "float32", -xb, xb)
        if bias:
            layer.bias = jt.zeros((out_features,), "float32")
    elif init == "default_zero_bias":
        layer.weight = jt.init.uniform((out_features, in_features), "float32", -bound, bound)
        if bias:
            layer.bias = jt.zeros((out_features,), "float32")
    else:
        raise ValueError(init)
    return layer


def softmax32(logits):
    """Router softmax in float32, cast back to the activation dtype (docs/moa.md §2.3)."""
    return nn.softmax(logits.float32(), dim=-1).cast(logits.dtype)


class _Recorder:
    """Mixin: keep the last routing weights (detached numpy on request) without changing outputs."""
    _record = False
    _last_weights = None

    def _remember(self, weights):
        if self._record:
            self._last_weights = weights.detach()


# ---------------------------------------------------------------------------- LoRA family
class MOELoraLayer(nn.Module, _Recorder):
    """LoRA on one projection (docs/moa.md §2.2–2.3): E=1 plain LoRA; E>1 MoLoRA (E pairs) or HydraLoRA (shared A).

    delta(x) = Σ_e g_e · (α/r) · B_e A_(e) x with g = softmax(router x) (fp32) when E > 1.
    """

    def __init__(self, in_features, out_features, rank, alpha, expert_num=1, hydra=False):
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.expert_num = rank, expert_num
        self.hydra = bool(hydra) and expert_num > 1
        self.scaling = alpha / rank
        if expert_num == 1:
            self.lora_A = linear(in_features, rank, bias=False)
            self.lora_B = linear(rank, out_features, bias=False, init="zeros")
            return
        self.router = linear(in_features, expert_num, bias=False)
        if self.hydra:
            self.lora_A = linear(in_features, rank, bias=False)
        else:
            self.lora_A_l = nn.ModuleList([linear(in_features, rank, bias=False) for _ in range(expert_num)])
        self.lora_B_l = nn.ModuleList([linear(rank, out_features, bias=False, init="zeros")
                                       for _ in range(expert_num)])

    def execute(self, x):
        if self.expert_num == 1:
            return self.lora_B(self.lora_A(x)) * self.scaling
        g = softmax32(self.router(x))                         # [..., E]
        self._remember(g)
        shared = self.lora_A(x) if self.hydra else None
        out = None
        for e in range(self.expert_num):
            h = shared if self.hydra else self.lora_A_l[e](x)
            term = self.lora_B_l[e](h) * g[..., e:e + 1]
            out = term if out is None else out + term
        return out * self.scaling


class LoraExpert(nn.Module):
    """One LoRA expert of the sparse MoE-LoRA modules: (α/r) · B A x."""

    def __init__(self, in_features, out_features, rank, alpha):
        self.lora_A = linear(in_features, rank, bias=False)
        self.lora_B = linear(rank, out_features, bias=False, init="zeros")
        self.scaling = alpha / rank

    def execute(self, x):
        return self.lora_B(self.lora_A(x)) * self.scaling


class NoisyTopkRouter(nn.Module):
    """Top-K router logits: linear(x) (+ N(0,1)·softplus(noise_linear x) when noisy, as the reference, always)."""

    def __init__(self, in_features, expert_num, noisy):
        self.topkroute_linear = linear(in_features, expert_num)
        self.noisy = noisy
        if noisy:
            self.noise_linear = linear(in_features, expert_num)

    def execute(self, x):
        logits = self.topkroute_linear(x)
        if self.noisy:
            logits = logits + jt.randn(logits.shape) * nn.softplus(self.noise_linear(x))
        return logits


def load_balance_loss(frac_counts, probs, n_tokens, expert_num):
    """Switch-style auxiliary loss (docs/moa.md §3.6): E · Σ_e (count_e/N) · (Σ_tokens p_e / N)."""
    return expert_num * ((frac_counts / n_tokens) * (probs.sum(0) / n_tokens)).sum()


FLT_MIN = 1.17549435e-38  # smallest normal float32


def renormalise(w):
    """w / Σ_e w per row; a row whose sum is 0 or denormal (|s| < FLT_MIN) is divided by 1 instead (docs/moa.md §3.6:
    "sum 0 → divide by 1"). Jittor's CPU kernels flush denormals, so a denormal divisor could become 0 (→ NaN)."""
    s = w.sum(-1, keepdims=True)
    return w / jt.ternary(s.abs() < FLT_MIN, jt.ones_like(s), s)


class _SparseMoE(nn.Module, _Recorder):
    """E LoRA experts on flattened tokens [N, in], mixed by per-token weights [N, E] (docs/moa.md §3.6). The module is
    the `lora_X` attribute itself, as in the reference: `lora_X.router.*`, `lora_X.experts.<e>.lora_{A,B}`."""

    def _make_experts(self, in_features, out_features, rank, alpha, expert_num):
        self.experts = nn.ModuleList([LoraExpert(in_features, out_features, rank, alpha) for _ in range(expert_num)])
        self.expert_num = expert_num
        self._lb_loss = None

    def _mix(self, flat, w, shape):
        self._remember(w.reshape(*shape[:-1], self.expert_num))
        out = None
        for e in range(self.expert_num):
            term = self.experts[e](flat) * w[:, e:e + 1]
            out = term if out is None else out + term
        return out.reshape(*shape[:-1], out.shape[-1])


class TopKMoE(_SparseMoE):
    """Top-K MoE-LoRA: p = softmax(router x); keep the top-k probabilities renormalised to sum 1."""

    def __init__(self, in_features, out_features, rank, alpha, expert_num, top_k, noisy):
        self.router = NoisyTopkRouter(in_features, expert_num, noisy)
        self._make_experts(in_features, out_features, rank, alpha, expert_num)
        self.top_k = top_k

    def execute(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                               # [N, in]
        p = nn.softmax(self.router(flat), dim=-1)                     # [N, E]
        _, idx = jt.topk(p, self.top_k, dim=-1)                       # [N, k]
        sel = jt.zeros(p.shape, dtype=p.dtype)
        for j in range(self.top_k):
            sel = sel + (jt.arange(self.expert_num).reshape(1, -1) == idx[:, j:j + 1]).cast(p.dtype)
        sel = sel.stop_grad()
        w = p * sel
        w = w / w.sum(-1, keepdims=True)                              # the sum ≥ max p ≥ 1/E: never near 0
        if self.is_training():
            self._lb_loss = load_balance_loss(sel.sum(0), p, flat.shape[0], self.expert_num)
        return self._mix(flat, w, shape)


def adamole_weights(g, tau):
    """AdaMoLE's expert weights from the router softmax g [N, E] and the threshold τ [N, 1]: a = g − τ,
    m = 1[a ≥ 0], w = renormalise(a·m). Returns (w, a, m); a and m feed the load-balance loss."""
    a = g - tau
    m = (a >= 0).cast(a.dtype).stop_grad()
    return renormalise(a * m), a, m


class AdaMoLE(_SparseMoE):
    """AdaMoLE: g = softmax(router x); τ = σ(threshold_fn x)/E; w = (g−τ)·1[g≥τ], renormalised (sum 0 → 1)."""

    def __init__(self, in_features, out_features, rank, alpha, expert_num, noisy):
        self.router = linear(in_features, expert_num)
        self.noisy = noisy
        if noisy:
            self.noise_linear = linear(in_features, expert_num)
        self.threshold_fn = linear(in_features, 1)
        self._make_experts(in_features, out_features, rank, alpha, expert_num)

    def execute(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.router(flat)
        if self.noisy:
            logits = logits + jt.randn(logits.shape) * nn.softplus(self.noise_linear(flat))
        g = nn.softmax(logits, dim=-1)
        w, a, m = adamole_weights(g, jt.sigmoid(self.threshold_fn(flat)) / self.expert_num)
        if self.is_training():
            self._lb_loss = load_balance_loss(m.sum(0), a, flat.shape[0], self.expert_num)
        return self._mix(flat, w, shape)


def SparseMoELoraLayer(in_features, out_features, rank, alpha, expert_num, routing, top_k=1, noisy=False):
    """The sparse MoE-LoRA module of one target: a TopKMoE (routing 'topk_moe') or an AdaMoLE ('adamole'),
    attached directly as `lora_X` so its keys are the reference's (`lora_X.router.topkroute_linear.weight`,
    `lora_X.threshold_fn.bias`, `lora_X.experts.0.lora_A.weight`, ...)."""
    if routing == "topk_moe":
        return TopKMoE(in_features, out_features, rank, alpha, expert_num, top_k, noisy)
    return AdaMoLE(in_features, out_features, rank, alpha, expert_num, noisy)


# ---------------------------------------------------------------------------- parallel adapter
class PAdapterLayer(nn.Module, _Recorder):
    """FFN-parallel bottleneck up(silu(down h)) on the ffn-normed state (docs/moa.md §2.4); Xavier gain 1e-4, zero
    bias."""

    def __init__(self, dim, size, expert_num=1, hydra=False):
        self.expert_num = expert_num
        self.hydra = bool(hydra) and expert_num > 1
        init = ("xavier", 1e-4)
        if expert_num == 1:
            self.down_proj = linear(dim, size, init=init)
            self.up_proj = linear(size, dim, init=init)
            return
        self.router = linear(dim, expert_num)
        if self.hydra:
            self.down_proj = linear(dim, size, init=init)
        else:
            self.down_proj_l = nn.ModuleList([linear(dim, size, init=init) for _ in range(expert_num)])
        self.up_proj_l = nn.ModuleList([linear(size, dim, init=init) for _ in range(expert_num)])

    def execute(self, x):
        if self.expert_num == 1:
            return self.up_proj(nn.silu(self.down_proj(x)))
        g = softmax32(self.router(x))
        self._remember(g)
        shared = nn.silu(self.down_proj(x)) if self.hydra else None
        out = None
        for e in range(self.expert_num):
            h = shared if self.hydra else nn.silu(self.down_proj_l[e](x))
            term = self.up_proj_l[e](h) * g[..., e:e + 1]
            out = term if out is None else out + term
        return out


# ---------------------------------------------------------------------------- prompt adapter
class PromptEmbedding(nn.Module):
    """The prompt table `prompt.weight` [E·P, d], N(0,1) like nn.Embedding's default."""

    def __init__(self, n, dim):
        self.weight = jt.randn((n, dim), "float32")


def attach_prompt(attention, args):
    """Give an Attention the reference's prompt parameters: `prompt`, zero `prompt_gate`, `prompt_router` (E>1)."""
    from Models.variants import experts_of
    E = experts_of(args)
    attention.prompt_experts = E
    attention.prompt_len = args.prompt_len
    attention.prompt = PromptEmbedding(E * args.prompt_len, args.dim)
    attention.prompt_gate = jt.zeros((1, args.n_heads, 1, 1), "float32")
    if E > 1:
        attention.prompt_router = linear(args.dim, E)


def prompt_keys_values(attention, dtype, start_pos=0, use_cache=False):
    """The prompt rows through the frozen wk / wv (no norm, no RoPE): keys and values [E·P, H_kv·hd].

    They depend only on wk, wv and the prompt table, so while decoding (no gradient, a KV cache,
    MOA_FUSED_ADAPTERS on) they are computed by a generation's first forward (start_pos 0) and reused by its later
    steps; every start_pos 0 forward computes them anew, and Attention.free_cache (end of a generation, train())
    drops them, so a weight update is always seen by the next generation.
    """
    keep = jt.flags.no_grad and use_cache and enabled("fused_adapters")
    cached = attention._prompt_kv
    if keep and start_pos > 0 and cached is not None and cached[0].dtype == dtype:
        note_used("fused_adapters")
        return cached
    pm = attention.prompt.weight.cast(dtype)                                       # [E·P, d]
    kv = (attention.wk(pm), attention.wv(pm))
    attention._prompt_kv = kv if keep else None
    return kv


def prompt_attention(attention, q, x, kv=None):
    """Zero-gated prompt attention (docs/moa.md §2.5). q: RoPE'd queries grouped by KV head, [B·H_kv, n_rep·T, hd]
    (head h = j·n_rep + r under KV head j, as in Attention.execute); x: the attention-normed input [B, T, d];
    kv: the prompt's keys and values (prompt_keys_values; computed here when None).

    Keys/values of the prompt go through the frozen wk/wv (no norm, no RoPE); their softmax is separate from the
    causal one; the per-head gate multiplies the probabilities. Returns [B, H, T, hd].
    """
    from Models.kernels import batched_matmul
    B, T = x.shape[0], x.shape[1]
    Hkv, rep, hd = attention.n_kv_heads, attention.n_rep, attention.head_dim
    E, P = attention.prompt_experts, attention.prompt_len
    R = E * P

    def per_group(p):  # prompt rows through a frozen projection [E·P, H_kv·hd] → [B·H_kv, E·P, hd]
        return p.reshape(R, Hkv, hd).transpose(1, 0, 2).broadcast((B, Hkv, R, hd)).reshape(B * Hkv, R, hd)

    kp, vp = (per_group(p) for p in (kv or prompt_keys_values(attention, q.dtype)))
    scores = batched_matmul(q, kp, transpose_b=True).float32() / math.sqrt(hd)     # [B·H_kv, n_rep·T, E·P]
    probs = nn.softmax(scores, dim=-1).cast(q.dtype).reshape(B, Hkv, rep, T, R)
    probs = probs * attention.prompt_gate.cast(q.dtype).reshape(1, Hkv, rep, 1, 1)
    probs = probs.reshape(B * Hkv, rep * T, R)
    if E == 1:
        return batched_matmul(probs, vp).reshape(B, Hkv * rep, T, hd)
    g = softmax32(attention.prompt_router(x))                                      # [B, T, E]
    out = None
    for e in range(E):
        o_e = batched_matmul(probs[:, :, e * P:(e + 1) * P], vp[:, e * P:(e + 1) * P, :])
        term = o_e.reshape(B, Hkv * rep, T, hd) * g[..., e].reshape(B, 1, T, 1)
        out = term if out is None else out + term
    return out
