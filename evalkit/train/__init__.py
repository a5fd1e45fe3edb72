"""train: labelled pairs -> weights. The fit loop as named steps, checkpoints, DDP set-up.

Owns the data plan and collation (`batches`), one optimizer step with accumulation and mixed
precision (`step`), torchrun process groups and collectives (`distributed`), checkpoints with
exact resume (`checkpoint`), and `fit`.
May import: `errors`, `_imports`, `_io`, `data`, `metrics`, `embed`, `search`, `evaluation`.
"""
