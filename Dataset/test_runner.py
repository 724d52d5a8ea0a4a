"""Generating answers for test sets and reading them off — the loop `inference.py` runs, shared with
`moefy.py evaluate --math_sets` (through the callback moefy.py hands to Models/moefication/pipeline.py).

`resolve_sets` turns --data_path items (files, comma lists, directories) into (set name, file, kind); `open_set`
reads one (Dataset/math_sets.py: math and commonsense records; Dataset/code_sets.py: HumanEval / MBPP); `Runner`
generates, every rank its contiguous shard of the records (`plan_batches`), rank 0 gathering the texts and turning
them into result records. `Runner.run_set` keeps inference.py's resumable `<set>.jsonl`; `Runner.predict_set`
generates every record afresh and writes the file at once (a temporary file renamed), scored by the set's own
scorer. The flags the Runner reads are engine/flags.py:add_generation_flags plus a few of inference.py's own.
"""
import json
import os
import time

import numpy as np

from Utils.errors import UserError
from Utils.prediction_file import PredictionWriter


def resolve_sets(data_paths, task="auto"):
    """[(set name, test file, kind)] from files, comma lists and directories (<dir>/test.json or
    <dir>/<name>/test.json); kind is "math", "humaneval" or "mbpp" (`task`: auto, math or code)."""
    from Dataset.code_sets import code_file_kind, code_set_name
    from Utils.evaluate import dataset_name_from_path
    files = []
    for item in data_paths:
        for path in filter(None, (s.strip() for s in item.split(","))):
            if os.path.isdir(path):
                if os.path.isfile(os.path.join(path, "test.json")):
                    files.append(os.path.join(path, "test.json"))
                    continue
                found = sorted(os.path.join(path, d, "test.json") for d in os.listdir(path)
                               if os.path.isfile(os.path.join(path, d, "test.json")))
                if not found:
                    raise UserError("%s: a directory without test.json or <name>/test.json inside" % path)
                files.extend(found)
            elif os.path.isfile(path):
                files.append(path)
            else:
                raise UserError("%s: data file not found" % path)
    sets, seen = [], {}
    for f in files:
        kind = code_file_kind(f) if task != "math" else None
        if task == "code" and kind is None:
            raise UserError("%s: not a HumanEval or MBPP JSONL file (--task code)" % f)
        name = code_set_name(f) if kind else dataset_name_from_path(f)
        if name in seen:
            raise UserError("%s and %s are both test set %r (one output file per set)" % (seen[name], f, name))
        seen[name] = f
        sets.append((name, f, kind or "math"))
    return sets


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
SHIPPED_GROUPS = ("math", "commonsense")   # data/<group>/<set>/test.json (data/README.md)


def shipped_sets(data_dir=SHIPPED):
    """{set name or group name: path} of the test sets in the repository's data/: every <group>/<set> directory
    holding a test.json, and each group as a whole ("math" = the six math sets)."""
    out = {}
    for group in SHIPPED_GROUPS:
        g = os.path.join(data_dir, group)
        if not os.path.isdir(g):
            continue
        out[group] = g
        for name in sorted(os.listdir(g)):
            if os.path.isfile(os.path.join(g, name, "test.json")):
                out[name] = os.path.join(g, name)
    return out


def resolve_named_sets(text, flag, data_dir=SHIPPED):
    """resolve_sets (task math) of a comma list whose items are paths, as --data_path takes them, or names of sets
    shipped in data/ (any case: gsm8k, AddSub, ..., boolq, ...; "math" / "commonsense" = the whole group). Errors
    are one line starting with `flag`."""
    shipped = shipped_sets(data_dir)
    by_lower = {k.lower(): v for k, v in shipped.items()}
    paths = []
    for item in filter(None, (s.strip() for s in str(text).split(","))):
        if os.path.exists(item):
            paths.append(item)
        elif item.lower() in by_lower:
            paths.append(by_lower[item.lower()])
        elif os.sep in item or "/" in item or item.lower().endswith((".json", ".jsonl")):
            raise UserError("%s: %s: data file not found" % (flag, item))
        else:
            raise UserError("%s: %r is neither a file nor a test set in %s (expected a path or one of %s)"
                            % (flag, item, data_dir, ", ".join(shipped)))
    if not paths:
        raise UserError("%s: no test set given (expected a comma list of set names or paths)" % flag)
    try:
        return resolve_sets(paths, "math")
    except UserError as e:
        raise UserError("%s: %s" % (flag, e))


def stem(path):
    return path[:-len(".jsonl")] if path.endswith(".jsonl") else os.path.splitext(path)[0]


def broadcast_from_main(make):
    """`make()` evaluated on rank 0 and handed to every rank; a UserError raised there stops every rank."""
    from Utils import distributed as dist
    value, error = None, None
    if dist.is_main_process():
        try:
            value = make()
        except UserError as e:
            error = str(e)
    value, error = dist.broadcast_object((value, error))
    if error is not None:
        raise UserError(error if dist.is_main_process() else "stopped: rank 0 reported an error")
    return value


def report_set(scored, out_path):
    """Print a set's summary lines and write them to <stem>_summary.txt; scored = (lines, info). Returns info."""
    lines, info = scored
    for line in lines:
        print(line, flush=True)
    with open(stem(out_path) + "_summary.txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    return info


def plan_batches(todo, world, batch_size, n_single):
    """Per rank, its batches of record indices: a contiguous shard ceil(len(todo)/world) of the todo list; the
    first `n_single` records of the todo list run alone (token-weight dumps need batch size 1)."""
    shard = -(-len(todo) // world) if todo else 0
    plans = []
    for r in range(world):
        batches, cur = [], []
        for pos in range(r * shard, min(len(todo), (r + 1) * shard)):
            if pos < n_single:
                batches.append([todo[pos]])
                continue
            cur.append(todo[pos])
            if len(cur) == batch_size:
                batches.append(cur)
                cur = []
        if cur:
            batches.append(cur)
        plans.append(batches)
    return plans


def batch_seed(seed, first_index):
    """Sampling seed of a batch: depends on --seed and the batch's first record only (not on rank or resume)."""
    return int(np.random.SeedSequence([seed, first_index]).generate_state(1)[0])


def open_set(name, path, kind, a):
    from Dataset.math_sets import MathSet
    if kind == "math":
        if a.prompt_template == "completion":
            raise UserError("%s: --prompt_template completion is for code sets only" % path)
        return MathSet(name, path, a)
    from Dataset.code_sets import CodeSet
    return CodeSet(name, path, kind, a)


class Runner:
    """Generates answers for test sets, every rank its shard of the records, rank 0 gathering them.

    A test set (Dataset.math_sets.MathSet, Dataset.code_sets.CodeSet) offers: name, records, fields,
    same(record, saved line), prepare() (rank 0, before generating), prompt_ids(i, tokenizer, max_seq_len, chat),
    results({i: text}) → {i: record} (rank 0; may hold some back), drain() → the held-back records,
    score(path) → (summary lines, info).

    `a` holds the flags of engine/flags.py:add_generation_flags plus seed, dump_type_weight, dump_token_weight and
    time_gen (inference.py's flags); `progress` shows a bar per set on rank 0."""

    def __init__(self, a, model, rank, world, progress=True):
        from Dataset.prompts import ChatPrompt
        self.a, self.model, self.rank, self.world = a, model, rank, world
        self.main = rank == 0
        self.progress = progress
        self.chat = ChatPrompt(a.chat_template_kwargs) if a.prompt_template == "chat" else None
        self.collector = None
        self.dump_indices = set()
        if a.dump_type_weight or a.dump_token_weight:
            from Models.routing_dump import RoutingCollector
            self.collector = RoutingCollector(model)

    def prompts(self, test_set, data_file):
        """Every record's prompt ids; one that leaves no room to generate is an error naming the file and record."""
        tok, msl = self.model.tokenizer, self.model.args.max_seq_len
        prompts = [test_set.prompt_ids(i, tok, msl, self.chat) for i in range(len(test_set.records))]
        for i, p in enumerate(prompts):
            if len(p) >= msl:
                raise UserError("%s: record %d: the prompt has %d tokens but max_seq_len is %d (raise --max_seq_len)"
                                % (data_file, i, len(p), msl))
        return prompts

    def generate(self, test_set, prompts, todo, sink, stats=None, dumper=None):
        """Generate the records `todo` (indices, every rank its contiguous shard). On rank 0 each round's result
        records go to `sink({index: record})`; returns (per-batch timings, token-weight dumps) there, None on the
        other ranks."""
        from Utils import distributed as dist
        a, tok = self.a, self.model.tokenizer
        plans = plan_batches(todo, self.world, a.max_batch_size, a.dump_token_weight)
        self.dump_indices = set(todo[:a.dump_token_weight])
        mine = plans[self.rank]
        n_rounds = max(len(p) for p in plans)
        dumps, timings = [], []
        bar = None
        if self.main:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc=test_set.name, unit="ex", dynamic_ncols=True, mininterval=1.0,
                       disable=not self.progress)
        started, n_tokens = time.perf_counter(), 0
        for r in range(n_rounds):
            payload = {"results": [], "time": None, "dumps": []}
            if r < len(mine):
                batch = mine[r]
                payload = self._generate(batch, [prompts[i] for i in batch], stats, dumper)
            gathered = dist.gather_objects(payload)
            if self.main:
                generations = {}
                for pl in gathered:
                    for i, out in pl["results"]:
                        generations[i] = tok.decode(out)
                        n_tokens += len(out)
                    if pl["time"] is not None:
                        timings.append(pl["time"])
                    dumps.extend(pl["dumps"])
                sink(test_set.results(generations))
                bar.update(len(generations))
                bar.set_postfix({"tok/s": "%.1f" % (n_tokens / max(time.perf_counter() - started, 1e-9))},
                                refresh=False)
        if bar is None:
            return None
        bar.close()
        return timings, dumps

    def run_set(self, test_set, data_file, out_path):
        """Generate what `<set>.jsonl` lacks (every rank its shard), write it on rank 0, return rank 0's score."""
        from Utils import distributed as dist
        from Models.routing_dump import TokenWeightDump, TypeWeightStats, save_pickle
        a, model, tok, name = self.a, self.model, self.model.tokenizer, test_set.name
        records = test_set.records
        prompts = self.prompts(test_set, data_file)
        writer = None

        def open_writer():
            nonlocal writer
            test_set.prepare()  # code sets: the sandbox must work before anything is generated
            writer = PredictionWriter(out_path, records, test_set.same, test_set.fields)
            return writer.completed(len(records))
        completed = broadcast_from_main(open_writer)
        todo = [i for i in range(len(records)) if not completed[i]]
        stats = TypeWeightStats(model.args) if a.dump_type_weight else None
        dumper = TokenWeightDump(model.args, tok) if a.dump_token_weight else None
        if self.main:
            print("%s: %d records, %d already done, %d to generate on %d rank(s)"
                  % (name, len(records), len(records) - len(todo), len(todo), self.world), flush=True)
        done = self.generate(test_set, prompts, todo, lambda results: writer.add(results), stats, dumper)
        merged = dist.gather_objects(stats.state() if stats else None)
        if not self.main:
            return None
        timings, dumps = done
        writer.add(test_set.drain())  # code sets: the programs still running in their sandboxes
        s = stem(out_path)
        if stats:
            save_pickle(TypeWeightStats.merge(merged), s + "_type_weight.pkl")
        if dumper:
            save_pickle(sorted(dumps, key=lambda e: e["index"]), s + "_token_weight.pkl")
        if a.time_gen:
            self._write_times(s, timings)
        if writer.done < len(records):
            raise UserError("%s: only %d of %d records written" % (out_path, writer.done, len(records)))
        return report_set(test_set.score(out_path), out_path)

    def predict_set(self, test_set, data_file, out_path):
        """Generate every record of `test_set` afresh (nothing is resumed: the model may have changed since a file
        was written), write `out_path` on rank 0 in one go (Utils/prediction_file.py:write_predictions) and score
        that file with the set's own scorer, as `inference.py --score_only` would. Returns (summary lines, info) on
        every rank."""
        from Utils.prediction_file import write_predictions
        n = len(test_set.records)
        prompts = self.prompts(test_set, data_file)
        broadcast_from_main(test_set.prepare)
        got = {}
        self.generate(test_set, prompts, list(range(n)), got.update)

        def finish():
            got.update(test_set.drain())
            if len(got) < n:
                raise UserError("%s: only %d of %d records generated" % (out_path, len(got), n))
            write_predictions(out_path, [got[i] for i in range(n)])
            return test_set.score(out_path)
        return broadcast_from_main(finish)

    def _generate(self, batch, prompts, stats, dumper):
        """Generate one batch on this rank; returns what rank 0 needs (outputs, timing, dumps)."""
        from Models.routing_dump import real_lengths
        a, model = self.a, self.model
        single_dump = dumper is not None and batch[0] in self.dump_indices  # such batches hold one record
        gen_len = a.max_gen_len + 1 if single_dump else a.max_gen_len  # one more step: the last token is read too
        if self.collector is not None:
            self.collector.reset()
        marks = []

        def on_step(start_pos, n):
            if not marks:
                marks.append(time.perf_counter())
            if self.collector is not None:
                self.collector(start_pos, n)
        t0 = time.perf_counter()
        outs = model.generate(prompts, gen_len, temperature=a.temperature, top_p=a.top_p,
                              seed=batch_seed(a.seed, batch[0]), on_step=on_step, top_k=a.top_k,
                              repetition_penalty=a.repetition_penalty)
        t1 = time.perf_counter()
        outs = [o[:a.max_gen_len] for o in outs]
        payload = {"results": list(zip(batch, outs)), "dumps": [],
                   "time": {"n": len(batch), "prefill_cost": (marks[0] if marks else t1) - t0,
                            "all_cost": t1 - t0, "inference_cost": t1 - (marks[0] if marks else t1),
                            "new_tokens": int(sum(len(o) for o in outs))}}
        if self.collector is not None:
            stacked = self.collector.stacked()
            if stats is not None:
                stats.add(stacked, real_lengths([len(p) for p in prompts], outs, a.max_gen_len, model.args.max_seq_len))
            if single_dump:
                payload["dumps"].append(dumper.entry(batch[0], stacked, prompts[0], outs[0]))
            self.collector.reset()
        return payload

    def _write_times(self, s, timings):
        """docs/moa.md §7 example_time.py: sums and per-example means over this run's batches (all ranks)."""
        total = sum(t["n"] for t in timings)
        all_cost = sum(t["all_cost"] for t in timings)
        inf_cost = sum(t["inference_cost"] for t in timings)
        line = {"all_cost": all_cost, "inference_cost": inf_cost, "total_ex": total,
                "mean_all_cost": all_cost / total if total else None,
                "mean_inference_cost": inf_cost / total if total else None,
                "prefill_cost": sum(t["prefill_cost"] for t in timings),
                "new_tokens": sum(t["new_tokens"] for t in timings), "max_batch_size": self.a.max_batch_size,
                "world_size": self.world, "batches": timings}
        with open("%s_bs%d_time.jsonl" % (s, self.a.max_batch_size), "a") as f:
            f.write(json.dumps(line) + "\n")


class AccuracyEval:
    """Accuracy of a model on fixed test sets, with inference.py's generation, answer extraction and scorer:
    `evaluate(model, out_dir)` runs `Runner.predict_set` on every set (every rank its shard; rank 0 writes
    `<out_dir>/<set>.jsonl`) and returns {set: accuracy, ..., "mean": unweighted mean} on every rank; `describe()`
    says what it runs (sets, records per set, generation flags).

    `a` is the Runner's flags (see Runner) with max_examples; `sets` = resolve_sets(...) entries. The sets are read
    here, so a bad file fails before any model is loaded."""

    def __init__(self, a, sets, progress=False):
        self.a, self.progress = a, progress
        if any(name == "mean" for name, _, _ in sets):
            raise UserError("a test set named 'mean' clashes with the mean accuracy's key; rename its directory")
        self.sets = [(open_set(name, f, kind, a), f) for name, f, kind in sets]

    GENERATION_KEYS = ("max_gen_len", "min_gen_len", "max_batch_size", "temperature", "top_p", "top_k",
                       "repetition_penalty", "aqua_rule", "prompt_template", "chat_template_kwargs", "seed")

    def describe(self):
        return {"sets": {ts.name: os.path.abspath(f) for ts, f in self.sets},
                "records": {ts.name: len(ts.records) for ts, _ in self.sets}, "max_examples": self.a.max_examples,
                "generation": {k: getattr(self.a, k) for k in self.GENERATION_KEYS}}

    def evaluate(self, model, out_dir):
        from Utils import distributed as dist
        runner = Runner(self.a, model, dist.rank(), dist.world_size(), self.progress)
        acc = {}
        for test_set, data_file in self.sets:
            _, info = runner.predict_set(test_set, data_file, os.path.join(out_dir, test_set.name + ".jsonl"))
            acc[test_set.name] = info["accuracy"]
        acc["mean"] = float(np.mean(list(acc.values())))
        return acc
