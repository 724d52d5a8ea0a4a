"""Which of the project's CPU kernels may run: one configuration, read once from the environment at import.

Every kernel in `Models/kernels.py`, `Models/adapter_kernels.py`, `Models/losses.py`, `Models/moe/` and
`engine/optim.py` has a Jittor fall-back and runs only where it applies (fp32 on the CPU, with g++/clang, and oneDNN
where it calls dnnl_sgemm). On top of that each can be switched off for comparison or debugging; `MOA_KERNELS=0`
switches them all off. Values: 1/true/yes/on or 0/false/no/off; anything else is an error at start-up.

| environment variable | field | kernel |
|---|---|---|
| MOA_FUSED_HEAD | fused_head | vocabulary head + cross-entropy, a vocabulary chunk at a time (losses.py) |
| MOA_DNNL_BMM | dnnl_bmm | attention's batched GEMMs through oneDNN (kernels.batched_matmul) |
| MOA_FUSED_SOFTMAX | fused_softmax | causal attention softmax, forward and backward |
| MOA_FUSED_ATTENTION | fused_attention | encoder–decoder attention: Q·Kᵀ, biased softmax and ·V per head, both ways |
| MOA_FUSED_NORM | fused_norm | RMSNorm, forward and backward |
| MOA_FUSED_ROPE | fused_rope | rotary embedding, forward and backward |
| MOA_FUSED_SWIGLU | fused_swiglu | the FFN's middle: silu(gate)·up, or a plain FFN's relu; forward and backward |
| MOA_FEW_ROWS_KERNEL | few_rows | decode-time projections and head that stream each weight once for all sequences |
| MOA_GROUPED_EXPERTS | grouped_experts | MoE experts on their token blocks straight from the stacked weights |
| MOA_FUSED_ADAPTERS | fused_adapters | decode-time router, LoRA, prompt and parallel adapter (adapter_kernels.py) |
| MOA_GRAD_NORM | grad_norm | each gradient's sum of squares for the global norm, multi-threaded (engine/optim.py) |
| MOA_FUSED_ADAMW | fused_adamw | one parameter's AdamW update in one multi-threaded pass (engine/optim.py) |

The few-rows kernels' dot products accumulate in one vector register per row: 16 floats with AVX-512, 8 with AVX2
(`MOA_VW` in Models/kernels.py). Until the 8-float variant they were on by default only with AVX-512F: 16-float
vectors split in two on an AVX2-only CPU ran 4x slower than oneDNN (the vocabulary head [8, 512] x [128256, 512]^T:
104 ms against 26 ms on a 2-core AMD EPYC); with 8-float vectors the same head takes 12.7 ms against oneDNN's 30 ms
there (bench/RESULTS.md), so every kernel defaults to on everywhere.

`used` counts, per field, how many times a kernel was chosen while building graphs: tests read it to make sure a
comparison "kernel on vs off" really exercised the kernel.
"""
import contextlib
import dataclasses
import os
from collections import Counter

from Utils.errors import UserError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass
class KernelConfig:
    fused_head: bool = True
    dnnl_bmm: bool = True
    fused_softmax: bool = True
    fused_attention: bool = True
    fused_norm: bool = True
    fused_rope: bool = True
    fused_swiglu: bool = True
    few_rows: bool = True
    grouped_experts: bool = True
    fused_adapters: bool = True
    grad_norm: bool = True
    fused_adamw: bool = True

    @staticmethod
    def env_name(field):
        return "MOA_FEW_ROWS_KERNEL" if field == "few_rows" else "MOA_" + field.upper()

    @classmethod
    def from_env(cls, environ=None):
        environ = os.environ if environ is None else environ
        default = _parse(environ, "MOA_KERNELS", True)
        return cls(**{f.name: _parse(environ, cls.env_name(f.name), default) for f in dataclasses.fields(cls)})


def _parse(environ, name, default):
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise UserError("environment variable %s=%r: expected 1/0, true/false, yes/no or on/off" % (name, raw))


KERNELS = KernelConfig.from_env()
used = Counter()


def enabled(field):
    """True when the kernel `field` is switched on (whether it applies to given inputs is the caller's check)."""
    return getattr(KERNELS, field)


def note_used(field):
    used[field] += 1


@contextlib.contextmanager
def override(**switches):
    """Temporarily set switches (tests and benchmarks): `with override(fused_head=False): ...`."""
    unknown = set(switches) - {f.name for f in dataclasses.fields(KernelConfig)}
    if unknown:
        raise ValueError("unknown kernel switch %s" % sorted(unknown)[0])
    saved = {k: getattr(KERNELS, k) for k in switches}
    for k, v in switches.items():
        setattr(KERNELS, k, bool(v))
    try:
        yield KERNELS
    finally:
        for k, v in saved.items():
            setattr(KERNELS, k, v)
