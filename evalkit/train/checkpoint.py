"""Files of a training run (evalkit.train.fit): checkpoints, the best model, the JSONL log, RNG states.

A checkpoint is OUT/checkpoints/step-N/ holding `model/` (a sentence-transformers model directory),
`trainer_state.pt` (optimizer, scheduler, scaler, data position, every rank's RNG states) and
`state.json` (the same position, readable). Every directory and JSON file is written under a
temporary name in the same folder, then renamed, so a crash never leaves a half-written one under
its real name.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

from evalkit._io import dumps_json, write_json_atomic
from evalkit.errors import EvalkitError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (when in use) CUDA generator states of this process."""
    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(root: Path, step: int, model: Any, payload: dict, keep: int | None) -> Path:
    """Write root/step-N via a temporary directory and one rename; keep only the newest `keep`."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp / "model")
    torch.save(payload, tmp / STATE_FILE)
    readable = ("step", "epoch", "step_in_epoch", "samples", "best", "config")
    write_json_atomic(tmp / "state.json", {k: payload[k] for k in readable}, default=str)
    replace_dir(tmp, final)
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_model_atomic(model: Any, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    replace_dir(tmp, dest)


def save_model(model: Any, path: Path) -> None:
    """model.save() without transformers' per-shard progress bar breaking into the training bar."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    st_logger = logging.getLogger("sentence_transformers")  # its "Saving model to ..." INFO line
    level = st_logger.level
    st_logger.setLevel(max(level, logging.WARNING))
    try:
        model.save(str(path), create_model_card=False)
    finally:
        st_logger.setLevel(level)
        if enabled:
            hf_logging.enable_progress_bar()


def replace_dir(src: Path, dest: Path) -> None:
    """Swap `src` into place as `dest`: at every instant one complete copy exists on disk."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path | None) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if root is None or not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.name.startswith("step-") and p.name[5:].isdigit() and (p / STATE_FILE).is_file():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def find_resume(resume: bool | str | os.PathLike, root: Path | None) -> Path | None:
    """resume=True: the newest checkpoint under `root` (None if there is none); a path: that one."""
    if resume is True:
        found = list_checkpoints(root)
        if not found:
            logger.info("no checkpoint in %s: starting from scratch", root)
            return None
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise EvalkitError(f"resume={str(path)!r} is not a checkpoint directory (no {STATE_FILE})")
    return path


def load_checkpoint(path: Path, model: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Load the model weights from `path` into `model`; -> the trainer state saved with them.

    The run must read the data in the same order, so `config` (rows, batch size, accumulation,
    seed, processes, shuffling) must equal the one saved. The state file is a pickle: load only
    checkpoints you wrote.
    """
    import torch

    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    then = saved["config"]
    diffs = [f"{k}: {then.get(k)!r} then, {v!r} now" for k, v in config.items() if then.get(k) != v]
    if diffs:
        raise EvalkitError(
            f"cannot resume exactly from {path}: the run changed ({'; '.join(diffs)}); resume with "
            "the same data, batch size, grad accumulation, seed and number of processes"
        )
    weights = type(model)(str(path / "model"), device="cpu").state_dict()
    model.load_state_dict(weights)
    return saved


def append_log(path: Path | None, record: dict[str, Any]) -> None:
    if path is None:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(dumps_json(record, indent=None, default=str) + "\n")


def trim_log(path: Path, step: int) -> None:
    """Drop log records after `step` (a resumed run writes them again; a fresh run starts empty)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
