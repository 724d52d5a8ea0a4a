"""LLaMA-3 base model, adapters, routers and thresholds of MoA, `ModelArgs` and the tokenizer (public API)."""
from Models.model_args import ModelArgs, parse_layers, parse_targets
from Models.tokenizer import Tokenizer


def __getattr__(name):
    # Jittor-backed classes are imported on first use so `from Models import ModelArgs` stays instant (dry runs).
    if name == "LLaMA_adapter":
        from Models.llama_adapter import LLaMA_adapter
        return LLaMA_adapter
    if name in ("MOELoraLayer", "PAdapterLayer", "SparseMoELoraLayer", "TopKMoE", "AdaMoLE"):
        import Models.adapters as a
        return getattr(a, name)
    if name in ("Router", "Gamma"):
        import Models.routing as r
        return getattr(r, name)
    if name == "Transformer":
        from Models.llama import Transformer
        return Transformer
    raise AttributeError(name)


__all__ = ["LLaMA_adapter", "ModelArgs", "Tokenizer", "MOELoraLayer", "PAdapterLayer", "SparseMoELoraLayer",
           "TopKMoE", "AdaMoLE", "Router", "Gamma", "Transformer", "parse_layers", "parse_targets"]
