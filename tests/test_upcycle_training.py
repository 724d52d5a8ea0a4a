"""Training an upcycled model (issue 16): the aux loss enters the engine's total multiplied by its weight (value and
gradient; the seed adds the weight instead), is logged apart from the LM loss with per-layer expert load; copies
with zero noise, k = E and a uniform router stay equal under training, with noise or a non-uniform router they move
apart; `trainable` moe/router/all select the right parameters; MoA adapters (attention LoRA + prompt + parallel
adapter) attach to the upcycled base and train through Math.py, FFN targets on MoE layers are refused."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from upcycle_fixtures import expert_blocks, load, make_dense, tokens, upcycle
from Models.upcycling import expert_spread
from Utils.errors import UserError


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dense") / "meta")
    make_dense(d)
    return d


class CaptureOptimizer:
    """Stands in for AdamW in Trainer.optimizer_step: keeps the gradients the engine computed, changes nothing."""

    def __init__(self):
        self.grads = None

    def set_lr(self, lr):
        pass

    def step(self, grads, grad_scale=1.0):
        self.grads = {k: g.numpy() * grad_scale for k, g in grads.items()}


def _trainer(model, tmp_path, optimizer=None, lr=1e-2):
    from Dataset.lm_batches import LMData
    from engine.trainer import TrainConfig, Trainer
    rows = [(t, t) for t in tokens(8, 16, seed=11)]
    cfg = TrainConfig(output_dir=str(tmp_path / "train"), lr=lr, schedule=lambda step, epoch: lr, progress=False)
    return Trainer(model, LMData(rows, 4), cfg, optimizer=optimizer)


def _batch(seed=11):
    t = tokens(4, 16, seed=seed).astype(np.int32)
    return {"tokens": t, "labels": t.copy()}


@pytest.mark.parametrize("aux", ["mi", "switch"])
def test_engine_multiplies_the_aux_loss_by_its_weight(dense, tmp_path, jt, aux):
    """total = lm + w·aux (switch: + 0.1·w·z): the engine's step loss and its router gradients equal the terms'
    combination with coefficient w = 0.25 — with the seed's `loss += w + aux` the coefficient would be 1."""
    w = 0.25
    out = upcycle(dense, str(tmp_path / aux), num_experts=4, expert_top_k=2, moe_start_layer=1, moe_layer_freq=2,
                  gate_type="mlp", gating_size=16, aux_loss_type=aux, aux_loss_weight=w)
    model = load(out, trainable="all")
    weights = model.loss_weights()
    want_w = {"aux_mi": w} if aux == "mi" else {"aux_switch": w, "aux_z": 0.1 * w}
    assert {k: v for k, v in weights.items() if k != "lm"} == pytest.approx(want_w)
    capture = CaptureOptimizer()
    trainer = _trainer(model, tmp_path, capture)
    record = trainer.optimizer_step([_batch()], lr=0.0)
    aux_terms = [k for k in want_w]
    assert set(aux_terms) <= set(record) and "lm" in record   # logged apart from the LM loss
    assert record["loss"] == pytest.approx(record["lm"] + sum(want_w[k] * record[k] for k in aux_terms), rel=1e-6)
    load_ = model.routing_load()
    assert sorted(load_) == [1, 3] and all(v.sum() == 4 * 16 * 2 for v in load_.values())   # per-layer load

    # gradients: d(total)/d(aux term) = w, checked on the routers (the only parameters the aux terms reach); one
    # forward per jt.grad (a custom kernel's backward releases what its forward saved)
    model.train()
    named = [(n, p) for n, p in model.trainable_parameters() if ".feed_forward.router." in n]

    def grads(combine):
        terms = model.loss_terms({k: jt.array(v) for k, v in _batch().items()})
        return [g.numpy() for g in jt.grad(combine(terms), [p for _, p in named])]
    g_lm = grads(lambda t: t["lm"])
    g_aux = grads(lambda t: sum((want_w[k] * t[k] for k in aux_terms[1:]), want_w[aux_terms[0]] * t[aux_terms[0]]))
    for (name, _), gl, ga in zip(named, g_lm, g_aux):
        want, got = gl + ga, capture.grads[name]
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), name
    assert max(np.abs(ga).max() for ga in g_aux) > 0   # the aux term really reaches the routers


def _train(model, tmp_path, steps=4, lr=3e-3):
    trainer = _trainer(model, tmp_path, lr=lr)
    model.train()
    for s in range(steps):
        trainer.optimizer_step([_batch(seed=20 + s)], lr)
    model.eval()


def _spread(model, layer):
    return expert_spread([expert_blocks(model, layer, p) for p in ("w1", "w3", "w2")])["distance"]


def test_copies_stay_equal_or_move_apart(dense, tmp_path, jt):
    """Issue 16: experts trained (router frozen) for 4 AdamW steps: zero noise, k = E and a uniform router —
    every copy gets the same gradient and stays bit-identical; noise, or a non-uniform router (k < E, or k = E with
    unequal weights), gives them different gradients and they move apart."""
    experts_only = lambda name: ".feed_forward.experts." in name
    cases = {"uniform_k_eq_E": (dict(expert_top_k=4), True, False),
             "noise": (dict(expert_top_k=4, noise_std=0.01), True, True),
             "router_k_lt_E": (dict(expert_top_k=2), False, True),
             "router_k_eq_E": (dict(expert_top_k=4), False, True)}
    for name, (cfg, zero_router, diverge) in cases.items():
        out = upcycle(dense, str(tmp_path / name), num_experts=4, gate_type="linear", moe_start_layer=1,
                      moe_layer_freq=2, **cfg)
        model = load(out, trainable=experts_only)
        if zero_router:
            for n, p in model.named_parameters():
                if ".router." in n:
                    p.update(jt.zeros(p.shape, "float32"))
        before = _spread(model, 1)
        w_before = expert_blocks(model, 1).copy()
        _train(model, tmp_path / name)
        after = _spread(model, 1)
        assert not np.array_equal(expert_blocks(model, 1), w_before), name   # training moved the experts
        if diverge:
            assert after > before + 1e-4, (name, before, after)
        else:
            assert before == after == 0.0, (name, before, after)


def test_trainable_parts_of_an_upcycled_model(dense, tmp_path):
    out = upcycle(dense, str(tmp_path / "m"), num_experts=4, expert_top_k=2, moe_start_layer=1, moe_layer_freq=2,
                  gate_type="linear", residual_moe=True)
    names = lambda spec: [n for n, _ in load(out, trainable=spec).trainable_parameters()]
    router = names("router")
    assert router and all(".feed_forward.router." in n for n in router)
    moe = names("moe")
    assert set(router) < set(moe) and all(".feed_forward." in n and ".layers.0." not in n for n in moe)
    assert {".experts.", ".shared."} <= {k for k in (".experts.", ".shared.") for n in moe if k in n}
    everything = names("all")
    assert len(everything) > len(moe) and any("attention.wq" in n for n in everything)


def test_moa_adapters_on_the_upcycled_base(dense, tmp_path, jt):
    """Attention LoRA + prompt + parallel adapter on every layer (MoE ones included) build, leave the base output
    unchanged at init and train through Math.py; FFN targets on an MoE layer are refused."""
    out = upcycle(dense, str(tmp_path / "m"), num_experts=4, expert_top_k=2, moe_start_layer=1, moe_layer_freq=2,
                  gate_type="linear")
    base = load(out).logits(tokens())
    kw = dict(routing="soft_moa", lora_layers="0-4", lora_targets="Q,K,V,O", prompt_layers="0-4",
              p_adapter_layers="0-4", expert_num=1)
    model = load(out, **kw)
    trainable = [n for n, _ in model.trainable_parameters()]
    assert trainable and not any(".feed_forward.experts." in n or ".router." in n and "feed_forward" in n
                                 for n in trainable)
    assert np.abs(model.logits(tokens()) - base).max() <= 1e-5
    with pytest.raises(UserError, match="whose FFN is a mixture of experts"):
        load(out, routing="soft_moa", lora_layers="0-4", lora_targets="Q,FFN_UP")
    load(out, routing="soft_moa", lora_layers="0-1,2-3", lora_targets="Q,FFN_UP")   # dense layers only: fine

    data = os.path.join(ROOT, "data", "math", "SingleEq", "test.json")
    run = tmp_path / "math"
    flags = ["--llama_path", out, "--data_path", data, "--output_dir", str(run), "--max_steps", "2", "--batch_size",
             "2", "--max_seq_len", "192", "--lr", "1e-3", "--log_interval", "1", "--save_interval", "0", "--progress",
             "false", "--lora_layers", "0-4", "--lora_targets", "Q,K,V,O", "--prompt_layers", "0-4",
             "--p_adapter_layers", "0-4"]
    r = subprocess.run([sys.executable, "Math.py"] + flags, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(run / "log.txt") as f:
        steps = [json.loads(line) for line in f if '"train"' in line]
    assert len(steps) == 2 and all(np.isfinite(s["loss"]) and s["loss"] > 0 for s in steps)
    assert os.path.isdir(run / "adapter")


def test_pretrain_and_sft_continue_an_upcycled_checkpoint(dense, tmp_path):
    """`pretrain.py --init_from OUT --trainable moe` and `sft.py --init_from OUT --trainable router` train the
    upcycled model: the log carries the LM loss, the aux term apart and each MoE layer's expert load; model/ loads
    back as the same MoE model."""
    out = upcycle(dense, str(tmp_path / "m"), num_experts=4, expert_top_k=2, moe_start_layer=1, moe_layer_freq=2,
                  gate_type="linear", aux_loss_type="mi", aux_loss_weight=0.01)
    text = tmp_path / "corpus.jsonl"
    text.write_text("".join(json.dumps({"text": "the expert number %d reads line %d of the corpus." % (i, i * 7)})
                            + "\n" for i in range(60)))
    chats = tmp_path / "sft.jsonl"
    chats.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": "What is %d plus 1?" % i},
                                                            {"role": "assistant", "content": "%d." % (i + 1)}]})
                             + "\n" for i in range(20)))
    common = ["--init_from", out, "--max_steps", "2", "--batch_size", "2", "--max_seq_len", "32", "--log_interval", "1",
              "--progress", "false", "--save_interval", "0"]
    for script, data, trainable in (("pretrain.py", text, "moe"), ("sft.py", chats, "router")):
        run = tmp_path / script.split(".")[0]
        r = subprocess.run([sys.executable, script, "--data_path", str(data), "--output_dir", str(run),
                            "--trainable", trainable] + common, capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, script + ":\n" + r.stderr[-3000:]
        with open(run / "log.txt") as f:
            steps = [json.loads(line) for line in f if '"train"' in line]
        assert len(steps) == 2, script
        for s in steps:
            assert np.isfinite(s["lm"]) and -np.log(4) - 1e-6 <= s["aux_mi"] <= 1e-6
            assert sorted(s["expert_load"]) == ["1", "3"]
        model = load(str(run / "model"))
        assert [i for i, _ in model.llama.moe_layers()] == [1, 3] and model.args.moe.aux_mi == 0.01
