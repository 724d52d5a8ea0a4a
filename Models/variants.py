"""The registry of adapter variants (the `routing` field): what each one builds and how it routes, in one table.

Code asks a variant for a property (`variant(args.routing).type_routed`) instead of comparing its name with string
lists, so adding a variant is one row here plus its own module code. docs/moa.md describes each variant and the
reference scripts it reproduces.
"""
from dataclasses import dataclass

from Utils.errors import UserError


@dataclass(frozen=True)
class Variant:
    name: str
    paper_name: str
    reference: str                 # the reference repository's model file
    block_route: str = ""          # per-block routing built by Models/routing.py ("" = adapters added unweighted)
    type_routed: bool = False      # a type router weights the block's adapter types (MoA)
    threshold: bool = False        # sparse MoA's per-token threshold Γ masks the type weights
    family_gates: bool = False     # UniPEFT: one sigmoid gate per adapter family
    expert_adapters: bool = False  # expert_num > 1 makes LoRA/prompt/PA soft mixtures of experts (MoLoRA, HydraLoRA)
    sparse_lora: bool = False      # LoRA experts chosen per token (Top-K, AdaMoLE) with a load-balance loss
    ffn_gate_target: bool = False  # FFN_GATE may be a LoRA target
    single_expert: bool = False    # adapters always have one expert (expert_num must be 1)
    all_layers: bool = False       # needs LoRA, prompt and parallel adapter in every layer
    warmup_epochs: float = 1.0     # the reference scripts' default warm-up
    padding_sensitive: bool = False  # routing sees padded positions (sequence mean, load-balance counts)


VARIANTS = {v.name: v for v in (
    Variant("soft_moa", "Soft MoA", "LLaMA3_soft_moa", block_route="soft_moa", type_routed=True,
            expert_adapters=True, ffn_gate_target=True),
    Variant("sparse_moa", "Sparse MoA", "LLaMA3_sparse_moa", block_route="sparse_moa", type_routed=True,
            threshold=True, ffn_gate_target=True, single_expert=True),
    Variant("instance_moa", "instance-level MoA", "LLaMA3_soft_moa_instance", block_route="instance_moa",
            type_routed=True, warmup_epochs=40.0, padding_sensitive=True),
    Variant("unipeft", "UniPEFT", "LLaMA3_UniPEFT", block_route="unipeft", family_gates=True, all_layers=True,
            warmup_epochs=40.0, padding_sensitive=True),
    Variant("soft_moe", "LoRA / MoLoRA / HydraLoRA / prompt / parallel adapter", "LLaMA3_soft_moe",
            expert_adapters=True),
    Variant("topk_moe", "Top-K MoE-LoRA", "LLaMA3_sparse_moe", expert_adapters=True, sparse_lora=True,
            warmup_epochs=40.0, padding_sensitive=True),
    Variant("adamole", "AdaMoLE", "LLaMA3_sparse_moe (adamole)", expert_adapters=True, sparse_lora=True,
            warmup_epochs=40.0, padding_sensitive=True),
)}
ROUTINGS = tuple(VARIANTS)


def variant(name):
    """The Variant called `name`, or a one-line error listing the known ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise UserError("routing: %r is not one of %s" % (name, ", ".join(ROUTINGS)))


def experts_of(args):
    """Experts per adapter (LoRA, prompt, PA) for this configuration: expert_num where the variant mixes experts."""
    return args.expert_num if variant(args.routing).expert_adapters else 1
