"""The MoE core (docs/architecture.md, "The MoE core"): config, routers, selection, dispatch, experts, auxiliary
losses and the MoEFeedForward layer shared by the MoE LLM, upcycling, MoEfication, the encoder–decoder MoE and
MoA's MoE-LoRA.

`MoEConfig` imports without Jittor; every other name is imported on first use (so config code stays instant).
"""
from Models.moe.config import MoEConfig

_LAZY = {
    "LinearRouter": "routers", "MLPRouter": "routers", "CosineRouter": "routers", "build_router": "routers",
    "Selection": "selection", "select": "selection", "dense_selection": "selection",
    "gather_rows": "dispatch", "scatter_rows": "dispatch", "combine": "dispatch",
    "Experts": "experts", "SharedExperts": "experts",
    "switch_loss": "aux_losses", "seq_aux_loss": "aux_losses", "cv2_loss": "aux_losses", "mi_loss": "aux_losses",
    "z_loss": "aux_losses", "aux_loss_terms": "aux_losses", "expert_load": "aux_losses",
    "MoEFeedForward": "layer",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module("Models.moe." + _LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["MoEConfig"] + sorted(_LAZY)
