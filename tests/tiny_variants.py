"""The tiny model and the table of adapter variants that several test files run over (one place, so a new
variant is added once). Tests that need a variant configured differently override it with `dict(VARIANTS[k], ...)`."""
from Models.model_args import ModelArgs

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=32, max_seq_len=64)
ALL = "0-2"
MOA = dict(lora_layers=ALL, lora_rank=4, lora_alpha=8, prompt_layers=ALL, prompt_len=3, p_adapter_layers=ALL,
           p_adapter_size=8)
LORA = dict(lora_layers=ALL, lora_rank=4, lora_alpha=8, lora_targets="Q,K,V,O,FFN_UP,FFN_DOWN")
QKVOD = "Q,K,V,O,FFN_DOWN"

VARIANTS = {
    "soft_moa": dict(MOA, routing="soft_moa", swi_x=2, lora_targets="Q,K,V,O,FFN_UP,FFN_GATE,FFN_DOWN"),
    "sparse_moa": dict(MOA, routing="sparse_moa", swi_x=2, lora_targets=QKVOD, prompt_layers="0-0"),
    "sparse_moa_const": dict(MOA, routing="sparse_moa", swi_x=0, lora_targets=QKVOD, const_threshold=True),
    "instance_moa": dict(MOA, routing="instance_moa", swi_x=2, lora_targets="Q,K,V,O,FFN_UP,FFN_DOWN"),
    "unipeft": dict(MOA, routing="unipeft", lora_targets=QKVOD),
    "soft_moe_lora": dict(LORA, routing="soft_moe"),
    "molora_e4": dict(LORA, routing="soft_moe", expert_num=4),
    "hydralora_e4": dict(LORA, routing="soft_moe", expert_num=4, hydra_moe=True),
    "prompt_only": dict(routing="soft_moe", prompt_layers=ALL, prompt_len=3),
    "prompt_moe_e2": dict(routing="soft_moe", prompt_layers=ALL, prompt_len=3, expert_num=2),
    "pa_only": dict(routing="soft_moe", p_adapter_layers=ALL, p_adapter_size=8),
    "pa_moe_hydra_e2": dict(routing="soft_moe", p_adapter_layers=ALL, p_adapter_size=8, expert_num=2,
                            p_adapter_hydra=True),
    "topk_moe_e4_k2": dict(LORA, routing="topk_moe", expert_num=4, top_k=2, lb_loss_coeff=0.01),
    "adamole_e4": dict(LORA, routing="adamole", expert_num=4, lb_loss_coeff=0.01),
}


def make_args(name, variants=VARIANTS, **kw):
    merged = dict(TINY)
    merged.update(variants[name])
    merged.update(kw)
    return ModelArgs(**merged)


def build(name, seed, materialize=True, variants=VARIANTS, **kw):
    """Seed, construct and (by default) materialise the weights at once: Jittor draws random initial values when
    the op *executes*, so without the sync the values depend on what else runs first."""
    from Models.llama_adapter import LLaMA_adapter
    from Utils.runtime import import_jittor, seed_everything
    seed_everything(seed)
    model = LLaMA_adapter(make_args(name, variants, **kw))
    if materialize:
        import_jittor().sync_all()
    return model
