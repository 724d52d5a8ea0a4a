"""The one training engine: optimiser (AdamW, clipping, loss scaling), schedules and the `Trainer` loop that every
front end (Math.py, pretrain.py, sft.py, train_seq2seq.py, the demo's base, the benchmarks) drives."""
