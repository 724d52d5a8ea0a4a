"""Base model against oracles: Hugging Face LlamaForCausalLM logits, full forward vs KV-cache decoding, loaders."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

HAS_ORACLE = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, std=0.08)


def _hf_logits(ckpt_dir, tokens, tmp_path):
    tok_file, out_file = str(tmp_path / "tokens.npy"), str(tmp_path / "oracle.npy")
    np.save(tok_file, tokens)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "oracles", "hf_logits.py"), ckpt_dir, tok_file,
                    out_file], check=True, env=env, capture_output=True)
    return np.load(out_file)


@pytest.mark.parametrize("scaled", [False, True], ids=["rope", "scaled_rope"])
def test_logits_match_huggingface_through_both_loaders(jt, tmp_path, scaled):
    if not HAS_ORACLE:
        pytest.fail("the torch + transformers oracle is not installed (pip install -r requirements-test.txt)")
    from Models import LLaMA_adapter
    from Models.tiny_checkpoint import make_tiny_checkpoint
    meta_dir, hf_dir = str(tmp_path / "meta"), str(tmp_path / "hf")
    kw = dict(TINY, use_scaled_rope=scaled, seed=3)
    make_tiny_checkpoint(meta_dir, fmt="meta", **kw)
    make_tiny_checkpoint(hf_dir, fmt="hf", **kw)
    tokens = np.random.default_rng(0).integers(0, 128256, size=(2, 150))
    oracle = _hf_logits(hf_dir, tokens, tmp_path)
    for d in (meta_dir, hf_dir):
        model = LLaMA_adapter.from_pretrained(d, max_seq_len=160)
        ours = model.logits(tokens)
        assert ours.shape == oracle.shape
        assert np.abs(ours - oracle).max() <= 1e-4, d


def test_scaled_rope_frequencies_follow_llama31_rule():
    from Models.llama import rope_frequencies
    hd, theta = 128, 500000.0
    base = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    got = rope_frequencies(hd, theta, True)
    for f, g in zip(base, got):
        wl = 2 * np.pi / f
        if wl < 2048:
            want = f
        elif wl > 8192:
            want = f / 8
        else:
            s = (8192 / wl - 1) / 3
            want = (1 - s) * f / 8 + s * f
        assert g == pytest.approx(want, rel=1e-6)
    assert np.allclose(rope_frequencies(hd, theta, False), base, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_model(jt, tmp_path_factory):
    from Models import LLaMA_adapter
    from Models.tiny_checkpoint import make_tiny_checkpoint
    d = str(tmp_path_factory.mktemp("ckpt"))
    make_tiny_checkpoint(d, fmt="meta", **dict(TINY, std=0.3), seed=1)
    return LLaMA_adapter.from_pretrained(d, max_seq_len=64)


def _greedy_by_full_forward(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model.logits(np.array([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_kv_cache_greedy_equals_repeated_full_forward(tiny_model):
    rng = np.random.default_rng(0)
    prompts = [[128000] + rng.integers(0, 128000, n).tolist() for n in (4, 9, 2)]
    batched = tiny_model.generate(prompts, 16, temperature=0.0)
    for p, g in zip(prompts, batched):
        full = _greedy_by_full_forward(tiny_model, p, 16)
        stop = next((i for i, t in enumerate(full) if t in tiny_model.tokenizer.stop_tokens), len(full))
        assert g == full[:stop]
    assert [tiny_model.generate([p], 16)[0] for p in prompts] == batched


class _ScriptedLlama:
    """Stand-in for the transformer: emits a fixed token schedule per sequence (tests the stopping rules only)."""

    def __init__(self, jt, schedule, vocab=128256):
        self.jt, self.schedule, self.vocab, self.calls = jt, schedule, vocab, 0

    def __call__(self, tokens, start_pos, use_cache, last_only):
        B = tokens.shape[0]
        logits = np.zeros((B, 1, self.vocab), np.float32)
        for b in range(B):
            logits[b, 0, self.schedule[b][min(self.calls, len(self.schedule[b]) - 1)]] = 1.0
        self.calls += 1
        return self.jt.array(logits)

    def free_caches(self):
        pass


def test_generation_stops_per_sequence_on_eos_and_eot(jt, tokenizer):
    from types import SimpleNamespace
    from Models.generation import generate
    sched = [[5, 128009, 7, 7, 7, 7, 7, 7], [6, 6, 128001, 9, 9, 9, 9, 9], [8] * 8]
    llama = _ScriptedLlama(jt, sched)
    model = SimpleNamespace(llama=llama, args=SimpleNamespace(max_seq_len=64), tokenizer=tokenizer)
    out = generate(model, [[128000, 1], [128000, 2], [128000, 3]], max_gen_len=3)
    assert out == [[5], [6, 6], [8, 8, 8]]
    assert llama.calls == 3  # the batch stops once every sequence has stopped or used its budget
    llama = _ScriptedLlama(jt, sched[:2])
    out = generate(SimpleNamespace(llama=llama, args=model.args, tokenizer=tokenizer), [[128000, 1], [128000, 2]], 8)
    assert out == [[5], [6, 6]] and llama.calls == 3


def test_kv_cache_is_lazy_and_not_a_parameter(tiny_model):
    attn = tiny_model.llama.layers[0].attention
    names = [n for n, _ in tiny_model.named_parameters()]
    assert not any("cache" in n for n in names)
    assert attn._cache_k is None
    tiny_model.generate([[128000, 5, 6]], 2)
    assert attn._cache_k is None  # freed after generation


def test_tokenizer_golden_values(tokenizer):
    assert tokenizer.encode("Hello world", bos=False, eos=False) == [9906, 1917]
    assert tokenizer.n_words == 128256
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.eot_id) == (128000, 128001, 128009)
    assert tokenizer.special_tokens["<|start_header_id|>"] == 128006
    assert tokenizer.special_tokens["<|end_header_id|>"] == 128007
    assert tokenizer.stop_tokens == {128001, 128009}
    ids = tokenizer.encode("<|eot_id|> is text here", bos=True, eos=True)
    assert ids[0] == 128000 and ids[-1] == 128001 and 128009 not in ids
    assert tokenizer.decode(tokenizer.encode("3 + 4 = 7.", False, False)) == "3 + 4 = 7."


# ----------------------------------------------------------------------------- loader errors
def _meta_dir(tmp_path, **kw):
    from Models.tiny_checkpoint import make_tiny_checkpoint
    d = str(tmp_path / "m")
    make_tiny_checkpoint(d, fmt="meta", **dict(TINY, **kw))
    return d


def test_unknown_params_key_is_an_error(jt, tmp_path):
    from Models import LLaMA_adapter
    from Utils.errors import UserError
    d = _meta_dir(tmp_path)
    p = os.path.join(d, "params.json")
    params = json.load(open(p))
    params["rope_scale"] = 2
    json.dump(params, open(p, "w"))
    with pytest.raises(UserError, match=r"params.json: unknown key 'rope_scale'"):
        LLaMA_adapter.from_pretrained(d)


def test_missing_and_misshaped_tensors_are_named(jt, tmp_path):
    from Models import LLaMA_adapter
    from Utils.checkpoint_io import read_torch_pth, write_torch_pth
    from Utils.errors import UserError
    d = _meta_dir(tmp_path)
    f = os.path.join(d, "consolidated.00.pth")
    state = read_torch_pth(f)
    good = dict(state)
    del state["layers.1.feed_forward.w2.weight"]
    write_torch_pth(f, state)
    with pytest.raises(UserError, match=r"layers\.1\.feed_forward\.w2\.weight"):
        LLaMA_adapter.from_pretrained(d)
    state = dict(good)
    state["norm.weight"] = np.ones(32, np.float32)
    write_torch_pth(f, state)
    with pytest.raises(UserError, match=r"norm\.weight.*\(32,\).*\(64,\)"):
        LLaMA_adapter.from_pretrained(d)
    state = dict(good)
    state["layers.0.attention.extra"] = np.ones(3, np.float32)
    write_torch_pth(f, state)
    with pytest.raises(UserError, match=r"layers\.0\.attention\.extra"):
        LLaMA_adapter.from_pretrained(d)


def test_loader_casts_to_model_dtype(jt, tmp_path):
    from Models import LLaMA_adapter
    d = _meta_dir(tmp_path, dtype="bfloat16")
    model = LLaMA_adapter.from_pretrained(d)
    assert all(str(p.dtype) == "float32" for _, p in model.named_parameters())


def test_missing_tokenizer_file_is_an_error(tmp_path):
    from Models import Tokenizer
    from Utils.errors import UserError
    with pytest.raises(UserError, match="tokenizer file not found"):
        Tokenizer(str(tmp_path / "nope.model"))


CLI_ERRORS = {
    "unknown_key": lambda d: _edit_json(os.path.join(d, "params.json"), bogus=1),
    "truncated_pth": lambda d: _truncate(os.path.join(d, "consolidated.00.pth")),
    "bad_tokenizer": lambda d: open(os.path.join(d, "tokenizer.model"), "w").write("not a tokenizer\n"),
}


def _edit_json(path, **kw):
    obj = json.load(open(path))
    obj.update(kw)
    json.dump(obj, open(path, "w"))


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_bad_checkpoint_is_one_line_without_traceback(tmp_path, case):
    d = _meta_dir(tmp_path)
    CLI_ERRORS[case](d)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "generate", "--ckpt_dir", d,
                        "--prompt", "1 + 1 ="], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert d in lines[0] or "tokenizer.model" in lines[0]


def test_llama2_params_json_without_rope_theta_uses_meta_llama2_default(tmp_path):
    """Meta's LLaMA-2 params.json has no rope_theta; its model code uses 10000 (LLaMA-3's files say 500000)."""
    import json
    from Models.model_args import ModelArgs
    p = tmp_path / "params.json"
    p.write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5,
                             "vocab_size": 1000}))
    assert ModelArgs.from_params_json(str(p)).rope_theta == 10000.0
    p.write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 1000, "rope_theta": 500000.0}))
    assert ModelArgs.from_params_json(str(p)).rope_theta == 500000.0
