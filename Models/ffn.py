"""The feed-forward half of a block: the dense FFN (SwiGLU, or a plain activation FFN) and `make_ffn`, which gives each
layer the FFN its `ModelArgs` asks for — dense, or a mixture of experts from the MoE core (Models/moe/).

MoA's FFN-side LoRA adapters (FFN_UP, FFN_GATE, FFN_DOWN) live on the dense FFN's projections; an MoE layer has one
set of projections per expert, so those targets are refused there (attention LoRA, prompts and the parallel adapter
attach to any layer).
"""
from Models.adapter_kernels import add_adapter, lora_swiglu
from Models.kernels import few_rows_swiglu, relu, swiglu
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn


def activation(name, x):
    if name == "silu":
        return nn.silu(x)
    if name == "relu":
        return relu(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + jt.erf(x * 0.7071067811865476))
    return 0.5 * x * (1.0 + jt.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))   # gelu_tanh


class FeedForward(nn.Module):
    """w2(act(w1 x) ⊙ w3 x) (gated, LLaMA's SwiGLU with silu) or w2(act(w1 x)) (plain); Meta's names w1/w2/w3."""

    def __init__(self, args, hidden=None):
        hidden = hidden or args.ffn_hidden_dim
        self.act, self.gated = args.hidden_act, args.ffn_gated
        self.w1 = nn.Linear(args.dim, hidden, bias=False)  # gate (or the plain FFN's input projection)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, hidden, bias=False) if self.gated else None  # up
        self.lora_GATE = self.lora_UP = self.lora_DOWN = None  # on w1, w3, w2 (Models.moa.attach_adapters)

    def execute(self, x, route):
        u = None
        if not self.gated:
            u = activation(self.act, add_adapter(self.w1(x), "lora_GATE", self.lora_GATE, x, route))
        elif self.act == "silu" and self.lora_GATE is None and self.lora_UP is None:
            u = few_rows_swiglu(x, self.w1, self.w3)   # decoding: gate, up and silu·up in one kernel call
        elif self.act == "silu":                       # the same with their LoRAs (Models/adapter_kernels.py)
            u = lora_swiglu(x, self.w1, self.w3, self.lora_GATE, self.lora_UP, route)
        if u is None:
            gate = add_adapter(self.w1(x), "lora_GATE", self.lora_GATE, x, route)
            up = add_adapter(self.w3(x), "lora_UP", self.lora_UP, x, route)
            u = swiglu(gate, up) if self.act == "silu" else activation(self.act, gate) * up
        return add_adapter(self.w2(u), "lora_DOWN", self.lora_DOWN, u, route)


def make_ffn(args, layer_id):
    """The FFN of layer `layer_id`: an MoEFeedForward where `args.moe` places one, else the dense FeedForward."""
    if args.moe is not None and layer_id in args.moe_layer_ids():
        from Models.moe.layer import MoEFeedForward
        return MoEFeedForward(args.dim, args.moe, n_experts=args.moe.experts_at(layer_id, args.n_layers),
                              expert_hidden=args.ffn_hidden_dim)
    return FeedForward(args)


def is_moe(ffn):
    return hasattr(ffn, "pop_selection")
