"""MoA on a tiny Qwen3 through the same command lines as on LLaMA (issue 19): transformers writes a random Qwen3
checkpoint (q/k norm, head_dim apart, tied embeddings, GQA) with a Qwen3-style chat template; Math.py trains soft MoA
on generated math records through that template with MoA_Transformers' router input (mpirun -np 2 agrees with one
process); inference.py answers generated problems greedily with routing dumps and runs a HumanEval-format set under
both launch modes. Every output is checked for content, not only for existence."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from chat_fixtures import write_qwen3_style_tokenizer
from conftest import ROOT
from Utils import safe_pickle

PY = sys.executable
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
QWEN3 = dict(vocab_size=6400, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             intermediate_size=96, num_hidden_layers=2, tie_word_embeddings=True, initializer_range=0.05,
             max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
CHAT = ["--prompt_template", "chat", "--chat_template_kwargs", '{"enable_thinking": false}']
MOA = ["--routing", "soft_moa", "--lora_layers", "0-2", "--lora_rank", "4", "--lora_targets", "Q,K,V,O,FFN_DOWN",
       "--prompt_layers", "0-2", "--prompt_len", "4", "--p_adapter_layers", "0-2", "--p_adapter_size", "8",
       "--swi_x", "4", "--router_input", "normed", "--max_seq_len", "160"]
LABELS = ["LoRA-Q", "LoRA-K", "LoRA-V", "Prompt", "LoRA-O", "LoRA-DOWN", "PAdapter"]
CODE_TASKS = [
    {"task_id": "Toy/0", "entry_point": "inc", "prompt": 'def inc(x):\n    """Return x + 1."""\n',
     "canonical_solution": "    return x + 1\n", "test": "def check(candidate):\n    assert candidate(1) == 2\n"},
    {"task_id": "Toy/1", "entry_point": "neg", "prompt": 'def neg(x):\n    """Return -x."""\n',
     "canonical_solution": "    return -x\n", "test": "def check(candidate):\n    assert candidate(3) == -3\n"},
]


def _run(args, np_=1, timeout=600):
    cmd = [PY] + [str(a) for a in args]
    if np_ > 1:
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np_)] + cmd
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _train_records(tokenizer, n):
    """Generated problems whose supervised part (answer + <|im_end|>) has one common length, so every rank's
    per-token mean is the global one and 2 ranks must equal 1 process."""
    from Dataset.encoding import IGNORE_INDEX, encode_example_info
    from Dataset.math_generator import generate_math_dataset
    from Dataset.prompts import ChatPrompt
    chat = ChatPrompt({"enable_thinking": False})
    by_len = {}
    for r in generate_math_dataset(600, "task", 1):
        enc = encode_example_info(r, tokenizer, 160, chat)
        by_len.setdefault(sum(t != IGNORE_INDEX for t in enc.labels), []).append(r)
    records = max(by_len.values(), key=len)[:n]
    assert len(records) == n
    return records


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny Qwen3ForCausalLM written by transformers (in its own process) + training and test files."""
    from Models.hf_tokenizer import HFTokenizer
    from Dataset.math_generator import generate_math_dataset
    base = tmp_path_factory.mktemp("qwen3")
    tok_dir = write_qwen3_style_tokenizer(str(base / "tok"))
    ckpt = str(base / "ckpt")
    jobs = str(base / "jobs.json")
    with open(jobs, "w") as f:
        json.dump([{"make": ckpt, "family": "qwen3", "config": QWEN3, "seed": 3, "tokenizer": tok_dir}], f)
    r = subprocess.run([PY, os.path.join(ROOT, "tests", "oracles", "hf_families.py"), jobs], capture_output=True,
                       text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), timeout=600)
    assert r.returncode == 0, "transformers could not write the Qwen3 checkpoint:\n" + r.stderr[-3000:]
    train, test = str(base / "train.json"), str(base / "math" / "test.json")
    with open(train, "w") as f:
        json.dump(_train_records(HFTokenizer(tok_dir), 16), f)
    os.makedirs(os.path.dirname(test))
    with open(test, "w") as f:
        json.dump(generate_math_dataset(4, "task", 7), f)
    code = str(base / "HumanEval.jsonl")
    with open(code, "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in CODE_TASKS)
    return {"base": base, "ckpt": ckpt, "train": train, "test": test, "code": code}


def _math_args(q, out, batch_size):
    return ["Math.py", "--llama_path", q["ckpt"], "--data_path", q["train"], "--output_dir", out, "--batch_size",
            batch_size, "--epochs", 3, "--warmup_epochs", 0, "--lr", "2e-2", "--log_interval", 1, "--save_interval", 0,
            "--progress", "false"] + MOA + CHAT


@pytest.fixture(scope="module")
def trained(qwen3):
    out = str(qwen3["base"] / "moa")
    _run(_math_args(qwen3, out, 4))
    return out


def _train_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == "train"]


def _adapter(out):
    from Utils.checkpoint_io import read_torch_pth
    return {k: np.asarray(v) for k, v in read_torch_pth(os.path.join(out, "adapter", "adapter.pth")).items()}


def test_the_base_is_qwen3_shaped(qwen3):
    from Models.model_args import ModelArgs
    with open(os.path.join(qwen3["ckpt"], "config.json")) as f:
        assert json.load(f)["model_type"] == "qwen3"
    a = ModelArgs.from_hf_config(os.path.join(qwen3["ckpt"], "config.json"))
    assert (a.qk_norm, a.head_dim, a.tie_word_embeddings, a.n_kv_heads, a.rope_theta) == (True, 32, True, 2, 1e6)
    assert a.head_dim != a.dim // a.n_heads


def test_soft_moa_trains_on_qwen3(trained):
    log = _train_log(trained)
    losses = [r["loss"] for r in log]
    assert [r["step"] for r in log] == list(range(1, 13))          # 16 records / batch 4 × 3 epochs
    assert all(np.isfinite(losses))
    assert abs(losses[0] - np.log(6400)) < 1.0                      # a random base: about ln V at the start
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3        # the last epoch is clearly better than the first
    with open(os.path.join(trained, "log.txt")) as f:
        assert json.loads(f.readline())["n_truncated"] == 0
    params = json.load(open(os.path.join(trained, "adapter", "adapter_params.json")))
    assert (params["routing"], params["router_input"], params["lora_layers"], params["swi_x"]) == \
        ("soft_moa", "normed", "0-2", 4)
    state = _adapter(trained)
    for layer in (0, 1):  # the reference's key names (docs/moa_transformers_notes.md §2 maps theirs onto these)
        p = "llama.layers.%d." % layer
        for key, shape in (("attention.lora_Q.lora_A.weight", (4, 64)), ("attention.lora_Q.lora_B.weight", (128, 4)),
                           ("attention.lora_K.lora_B.weight", (64, 4)), ("attention.lora_O.lora_A.weight", (4, 128)),
                           ("feed_forward.lora_DOWN.lora_A.weight", (4, 96)), ("p_adapter.down_proj.weight", (8, 64)),
                           ("adapter_type_router.w1.weight", (28, 64)), ("adapter_type_router.w2.weight", (7, 28))):
            assert state[p + key].shape == shape, key
        assert np.abs(state[p + "attention.lora_Q.lora_B.weight"]).max() > 0   # B left zero: it trained
    assert all(k.startswith("llama.layers.") for k in state) and all(np.isfinite(v).all() for v in state.values())


def test_two_ranks_agree_with_one(qwen3, trained):
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is not installed (run.sh installs openmpi-bin)")
    out = str(qwen3["base"] / "moa_mpi")
    _run(_math_args(qwen3, out, 2), np_=2)                          # 2 ranks × 2 = the same global batch of 4
    one, two = _adapter(trained), _adapter(out)
    assert sorted(one) == sorted(two)
    assert max(float(np.abs(one[k] - two[k]).max()) for k in one) <= 1e-5
    np.testing.assert_allclose([r["loss"] for r in _train_log(out)], [r["loss"] for r in _train_log(trained)],
                               rtol=1e-5)


def test_inference_answers_and_dumps_routing(qwen3, trained):
    from Dataset.records import load_records
    from Utils.evaluate import score_records
    out = str(qwen3["base"] / "pred" / "math.jsonl")
    r = _run(["inference.py", "--ckpt_dir", qwen3["ckpt"], "--adapter_path", os.path.join(trained, "adapter"),
              "--data_path", qwen3["test"], "--save_path", out, "--max_gen_len", 40, "--temperature", 0,
              "--max_batch_size", 2, "--dump_type_weight"] + CHAT)
    recs = [json.loads(line) for line in open(out)]
    data = load_records(qwen3["test"], require_output=False)
    assert [x["instruction"] for x in recs] == [x["instruction"] for x in data]
    assert all(x["generate"] and "<|im_start|>" not in x["generate"] for x in recs)   # stopped at <|im_end|>
    scored, acc = score_records("math", recs)
    assert [s["correct"] for s in scored] == [x["correct"] for x in recs]
    assert "math Accuracy: %d/4" % sum(x["correct"] for x in recs) in r.stdout
    assert json.load(open(os.path.join(os.path.dirname(out), "acc_score.json")))["math"] == pytest.approx(acc)
    tw = safe_pickle.load(os.path.join(os.path.dirname(out), "math_type_weight.pkl"))
    assert tw["routing"] == "soft_moa" and sorted(tw["layers"]) == [0, 1] and tw["num_examples"] == 4
    for layer, st in tw["layers"].items():
        assert tw["labels"][layer] == LABELS and st["sum_weights"].shape == (len(LABELS),)
        mean = st["sum_weights"] / tw["token_num"]
        assert np.all(mean > 0) and np.all(mean < 1)                # sigmoid type weights of soft MoA
    assert tw["token_num"] >= 4 * 30


def test_code_set_on_qwen3_one_and_two_ranks(qwen3, trained):
    outs = []
    for np_ in (1, 2):
        out = str(qwen3["base"] / ("code%d" % np_) / "HumanEval.jsonl")
        r = _run(["inference.py", "--ckpt_dir", qwen3["ckpt"], "--adapter_path", os.path.join(trained, "adapter"),
                  "--data_path", qwen3["code"], "--save_path", out, "--max_gen_len", 12, "--temperature", 0,
                  "--max_batch_size", 1, "--code_timeout", 5], np_=np_)
        assert r.stdout.count("HumanEval pass@1: ") == 1               # rank 0 alone reports
        outs.append(out)
    recs = [json.loads(line) for line in open(outs[0])]
    assert [x["task_id"] for x in recs] == ["Toy/0", "Toy/1"]
    assert all(x["status"] in ("passed", "failed", "timeout", "error") and x["passed"] == (x["status"] == "passed")
               for x in recs)
    assert open(outs[0]).read() == open(outs[1]).read()


def test_dry_run_reports_the_router_input(qwen3):
    r = _run(["Math.py", "--llama_path", qwen3["ckpt"], "--dry_run"] + MOA)
    model = json.loads(r.stdout.split("model: ", 1)[1].splitlines()[0])
    assert model["router_input"] == "normed" and model["qk_norm"] and model["head_dim"] == 32
    bad = subprocess.run([PY, "Math.py", "--llama_path", qwen3["ckpt"], "--dry_run", "--router_input", "input"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--router_input" in bad.stderr and "Traceback" not in bad.stderr
