"""Routing of MoA (docs/moa.md §2.6, §3.1–3.4, D1, D2): type routers, the trainable threshold Γ, and the per-forward
`route` objects that weight each adapter's output (dense, sparse gather→adapter→scatter, instance, UniPEFT gates).
"""
from Models.adapter_kernels import type_weights
from Models.adapters import linear
from Models.kernel_config import enabled, note_used
from Models.kernels import FEW_ROWS_MAX
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn

# Column order of the type weights is fixed by the reference (docs/moa.md §3.1): attention group, FFN group, PA.
TYPE_ORDER = ("lora_Q", "lora_K", "lora_V", "prompt", "lora_O", "lora_UP", "lora_GATE", "lora_DOWN", "p_adapter")
TYPE_LABELS = {"lora_Q": "LoRA-Q", "lora_K": "LoRA-K", "lora_V": "LoRA-V", "prompt": "Prompt", "lora_O": "LoRA-O",
               "lora_UP": "LoRA-UP", "lora_GATE": "LoRA-GATE", "lora_DOWN": "LoRA-DOWN", "p_adapter": "PAdapter"}
TARGET_ATTR = {"Q": "lora_Q", "K": "lora_K", "V": "lora_V", "O": "lora_O",
               "FFN_UP": "lora_UP", "FFN_GATE": "lora_GATE", "FFN_DOWN": "lora_DOWN"}


class Router(nn.Module):
    """SwiGLU type router w2(silu(w1 x) ⊙ w3 x), hidden s·n, default weight init, all biases zero (docs/moa.md §2.6)."""

    def __init__(self, dim, hidden, n):
        self.w1 = linear(dim, hidden, init="default_zero_bias")
        self.w2 = linear(hidden, n, init="default_zero_bias")
        self.w3 = linear(dim, hidden, init="default_zero_bias")

    def execute(self, x):
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


def make_type_router(dim, n, swi_x):
    """`Linear(d→n)` with bias when swi_x = 0, else the SwiGLU Router with hidden swi_x·n."""
    return linear(dim, n) if swi_x == 0 else Router(dim, swi_x * n, n)


class Gamma(nn.Module):
    """Per-token threshold Γ = Γ_max·σ(W_Γ x + b_Γ) [.., 1], or the constant Γ_max (no parameters).

    Stored like the reference's `adapter_threshold_fn = nn.Linear(d, 1)` (keys `.weight`, `.bias`).
    """

    def __init__(self, dim, max_threshold, const=False):
        self.max_threshold = float(max_threshold)
        self.const = bool(const)
        if not self.const:
            bound = 1.0 / dim ** 0.5
            self.weight = jt.init.uniform((1, dim), "float32", -bound, bound)
            self.bias = jt.init.uniform((1,), "float32", -bound, bound)

    def execute(self, x):
        if self.const:
            return jt.full((*x.shape[:-1], 1), self.max_threshold, dtype="float32")
        return self.max_threshold * jt.sigmoid(nn.linear(x.float32(), self.weight, self.bias))


def _column(weights, idx):
    return weights[..., idx:idx + 1]


def _scale_like(delta, w):
    """Broadcast per-token weights [B, T, 1] onto a delta; prompt deltas are [B, H, T, hd]."""
    if delta.ndim == 4:
        B, T = w.shape[0], w.shape[1]
        w = w.reshape(B, 1, T, 1)
    return delta * w.cast(delta.dtype)


class TypeRoute:
    """Per-token (or per-sequence) weights [B, T|1, n] over the block's adapter types."""

    def __init__(self, weights, columns):
        self.weights, self.columns = weights, columns

    def apply(self, name, adapter, x):
        return _scale_like(adapter(x), _column(self.weights, self.columns[name]))

    def scale(self, name, delta):
        return _scale_like(delta, _column(self.weights, self.columns[name]))

    def weight_of(self, name):
        """(weights [B, T|1, n], column of `name`): for kernels that weight an adapter's output themselves."""
        return self.weights, self.columns[name]


class SparseTypeRoute(TypeRoute):
    """Sparse MoA: each adapter runs only on the tokens whose masked weight is non-zero (gather → scatter). When
    decoding (no gradient, ≤ FEW_ROWS_MAX tokens, MOA_FUSED_ADAPTERS on) it runs on every token instead and is
    multiplied by the masked weight, exactly 0 where it is off: the same numbers without `jt.nonzero`'s host sync.
    `weight_of` gives the masked weights, so the decode kernels (Models/adapter_kernels.py) do the same."""

    def __init__(self, weights, columns, mask):
        super().__init__(weights, columns)
        self.mask = mask

    def apply(self, name, adapter, x):
        i = self.columns[name]
        w = _column(self.weights, i)                              # [B, T, 1] masked weights
        B, T, D = x.shape
        if jt.flags.no_grad and B * T <= FEW_ROWS_MAX and enabled("fused_adapters"):
            note_used("fused_adapters")
            return adapter(x) * w.cast(x.dtype)
        sel = self.mask[..., i].reshape(-1)                       # [B·T] bool
        rows = jt.nonzero(sel)                                    # [m, 1] (dynamic shape: a sync point)
        m = rows.shape[0]
        if m == 0:
            return None
        if m == B * T:                                            # every token selected: no gather needed
            return adapter(x) * w.cast(x.dtype)
        rows = rows.reshape(-1)
        picked = x.reshape(B * T, D)[rows]                        # [m, D]
        delta = adapter(picked.reshape(1, m, D)).reshape(m, -1) * w.reshape(B * T, 1)[rows].cast(x.dtype)
        out = jt.zeros((B * T, delta.shape[-1]), dtype=delta.dtype)
        out = jt.scatter(out, 0, rows.reshape(m, 1).broadcast(delta.shape), delta, reduce="add")
        return out.reshape(B, T, -1)


class GateRoute:
    """UniPEFT: one sigmoid gate per family from the sequence mean (D2: the PA uses its own `p_adapter_gate`)."""

    def __init__(self, g_lora, g_prompt, g_pa):
        self.g = {"lora": g_lora, "prompt": g_prompt, "p_adapter": g_pa}

    def _gate(self, name):
        return self.g["lora" if name.startswith("lora_") else name]

    def apply(self, name, adapter, x):
        return _scale_like(adapter(x), self._gate(name))

    def scale(self, name, delta):
        return _scale_like(delta, self._gate(name))

    def weight_of(self, name):
        return self._gate(name), 0                                # [B, 1, 1]


def masked_weights(w, gamma, threshold_grad):
    """Sparse MoA effective weights (docs/moa.md §3.2, D1). Mask m = 1[w − Γ ≥ 0].

    none: w·m (reference; Γ gets no gradient). ste: w·m + (w−Γ)·m − stop_grad((w−Γ)·m) (same forward, Γ and
    router get the shifted gradient). shifted: (w−Γ)·m (AdaMoLE-style).
    """
    m = ((w - gamma) >= 0).stop_grad()
    mf = m.cast(w.dtype)
    if threshold_grad == "none":
        return w * mf, m
    shifted = (w - gamma) * mf
    if threshold_grad == "shifted":
        return shifted, m
    return w * mf + shifted - shifted.detach(), m


def build_route(block, x, start_pos):
    """The route of one block forward, from the block's routing kind and parameters."""
    kind = block.routing_kind
    if kind is None:
        return None
    if kind == "unipeft":
        if start_pos == 0 or block._instance_cache is None:
            mean = x.float32().mean(1, keepdims=True)             # [B, 1, d]
            block._instance_cache = tuple(jt.sigmoid(g(mean)) for g in
                                          (block.lora_gate, block.prompt_gate, block.p_adapter_gate))
        g = block._instance_cache
        block._remember_route(jt.concat(list(g), dim=-1), None, None)
        return GateRoute(*g)
    if kind == "instance_moa":
        if start_pos == 0 or block._instance_cache is None:
            block._instance_cache = jt.sigmoid(block.adapter_type_router(x.float32().mean(1, keepdims=True)))
        w = block._instance_cache.cast(x.dtype)                   # [B, 1, n] shared by all tokens
        block._remember_route(w, None, None)
        return TypeRoute(w, block.type_columns)
    fused = type_weights(block, x)    # decoding: router, sigmoid (and Γ, mask) in one call; None otherwise
    if kind == "soft_moa":
        w = fused[0] if fused is not None else jt.sigmoid(block.adapter_type_router(x.float32())).cast(x.dtype)
        block._remember_route(w, None, None)                          # [B, T, n]
        return TypeRoute(w, block.type_columns)
    if fused is not None:
        wm, gamma, mask = fused[0], fused[1], fused[2] > 0.5          # masked weights, Γ, the mask as 0/1
    else:
        w = jt.sigmoid(block.adapter_type_router(x.float32())).cast(x.dtype)
        gamma = block.adapter_threshold_fn(x).cast(x.dtype)          # [B, T, 1]
        wm, mask = masked_weights(w, gamma, block.threshold_grad)
    block._remember_route(wm, gamma, mask)
    return SparseTypeRoute(wm, block.type_columns, mask)
