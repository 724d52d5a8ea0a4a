"""Math and commonsense test sets in inference.py (docs/moa.md §7, §8): records with an answer, the prediction read off
each
generation (Utils.evaluate), accuracy of a predictions file. The code-set counterpart is Dataset/code_sets.py."""
import math
import os

from Utils.errors import UserError
from Utils.prediction_file import MATH_FIELDS, same_math_record


def _pred_json(pred):
    return None if isinstance(pred, float) and math.isinf(pred) else pred


def score_math_file(name, path, aqua_rule):
    """Score a predictions file: (summary lines, {accuracy, correct, total, file[, accuracy_<rule>]})."""
    from Dataset.records import load_records
    from Utils.evaluate import score_records, summary_line
    records = load_records(path, require_output=False, require_answer=True)
    try:
        scored, acc = score_records(name, records, aqua_rule)
    except ValueError as e:
        raise UserError("%s: %s" % (path, e))
    k, n = sum(r["correct"] for r in scored), len(scored)
    info = {"accuracy": acc, "correct": k, "total": n, "file": os.path.abspath(path)}
    lines = [summary_line(name, k, n)]
    if name == "AQuA":  # D9: report both letter rules
        info["aqua_rule"] = aqua_rule
        other = "first" if aqua_rule == "answer_is" else "answer_is"
        scored2, acc2 = score_records(name, records, other)
        k2 = sum(r["correct"] for r in scored2)
        info["accuracy_" + other] = acc2
        lines = [lines[0] + " (aqua_rule %s)" % aqua_rule, summary_line(name, k2, n) + " (aqua_rule %s)" % other]
    return lines, info


class MathSet:
    """A math / commonsense test set as the Runner sees it: records with an answer, scored by accuracy."""

    fields = MATH_FIELDS

    def __init__(self, name, path, a):
        from Dataset.records import load_records
        self.name, self.a, self.same = name, a, same_math_record
        self.records = load_records(path, require_output=False, require_answer=True)[:a.max_examples]

    def prompt_ids(self, i, tokenizer, max_seq_len, chat):
        from Dataset.prompts import prompt_ids
        return prompt_ids(self.records[i], tokenizer, max_seq_len, self.a.min_gen_len, chat)

    def results(self, generations):
        """{index: decoded text} → {index: output record} (answer extracted and judged)."""
        from Utils.evaluate import extract_answer, is_correct
        out = {}
        for i, text in generations.items():
            rec = self.records[i]
            pred = extract_answer(self.name, text, self.a.aqua_rule)
            out[i] = {"instruction": rec["instruction"], "input": rec["input"], "output": rec["output"],
                      "answer": rec["answer"], "generate": text, "pred": _pred_json(pred),
                      "correct": bool(is_correct(self.name, pred, rec["answer"]))}
        return out

    def prepare(self):
        pass

    def drain(self):
        return {}

    def score(self, out_path):
        return score_math_file(self.name, out_path, self.a.aqua_rule)
