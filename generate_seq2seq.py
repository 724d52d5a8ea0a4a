"""Answer questions with a trained encoder–decoder (or an HF SwitchTransformers directory).

    python generate_seq2seq.py --model out/model --text "What is 3 + 4?" [--text ...]
    python generate_seq2seq.py --model out/model --input test.json [--output preds.jsonl]
        [--num_beams 4 | --temperature 0.9 --top_k 50 --top_p 0.95 --seed 0] [--max_new_tokens 64]

`--input` takes the training format (JSON list or JSON lines of {"question", "answer"}); when the records carry
answers, exact match, BLEU and chrF (sacrebleu) are printed. Greedy by default; beam search with --num_beams;
sampling with --temperature > 0. The source is encoded as in training (Dataset/seq2seq_data.Encoder).
"""
import json
import os
import sys

from Utils.cli import Parser
from Utils.errors import UserError, cli_main


def build_parser():
    p = Parser(description="Generate answers with the encoder-decoder MoE (Jittor)")
    a = p.add_argument
    a("--model", required=True, help="model directory written by train_seq2seq.py, or an HF Switch directory")
    a("--tokenizer", default="", help="tokenizer directory (default: the model directory's)")
    a("--text", action="append", default=[], help="a question (repeatable)")
    a("--input", default="", help="question/answer records (JSON list or JSON lines)")
    a("--output", default="", help="write {question, prediction[, reference]} JSON lines here")
    a("--max_new_tokens", type=int, default=64)
    a("--num_beams", type=int, default=1)
    a("--length_penalty", type=float, default=1.0)
    a("--temperature", type=float, default=0.0)
    a("--top_k", type=int, default=0)
    a("--top_p", type=float, default=1.0)
    a("--repetition_penalty", type=float, default=1.0)
    a("--seed", type=int, default=0)
    a("--batch_size", type=int, default=32)
    a("--max_src_len", type=int, default=256)
    return p


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if bool(args.text) == bool(args.input):
        raise UserError("give --text (one or more) or --input, not both")
    if not os.path.isdir(args.model):
        raise UserError("--model: %s is not a directory" % args.model)
    from Dataset.seq2seq_data import Encoder, load_pairs
    from Models.seq2seq.files import load_model
    from Models.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_model(args.model, tokenizer)
    pairs = [(t, None) for t in args.text] if args.text else load_pairs(args.input)
    enc = Encoder(tokenizer, args.max_src_len, 2)
    out = model.generate([enc.source(q) for q, _ in pairs], max_new_tokens=args.max_new_tokens,
                         num_beams=args.num_beams, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty, length_penalty=args.length_penalty,
                         seed=args.seed, batch_size=args.batch_size)
    preds = [tokenizer.decode(t).strip() for t in out]
    rows = [dict(question=q, prediction=p, **({} if a is None else {"reference": a.strip()}))
            for (q, a), p in zip(pairs, preds)]
    if args.output:
        with open(args.output + ".tmp", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(args.output + ".tmp", args.output)
    if args.text or not args.output:
        for r in rows:
            print("Q: %s\nA: %s" % (r["question"], r["prediction"]))
    refs = [r.get("reference") for r in rows]
    if all(x is not None for x in refs):
        import sacrebleu
        em = sum(p == r for p, r in zip(preds, refs)) / len(refs)
        print(json.dumps({"n": len(refs), "exact_match": em, "bleu": sacrebleu.corpus_bleu(preds, [refs]).score,
                          "chrf": sacrebleu.corpus_chrf(preds, [refs]).score}))
    return 0


if __name__ == "__main__":
    sys.exit(main() or 0)
