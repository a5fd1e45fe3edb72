"""What a training run folder holds, for the sweep: its complete checkpoints, best model and base.

1) A target is a run folder (`evalkit train` OUT: `checkpoints/step-N/model`, `best/`,
   `train_args.json`, `result.json`; or a sentence-transformers / HF Trainer output_dir with
   `checkpoint-N/` model folders) or a model folder (modules.json or config.json).
2) Complete checkpoints only: `evalkit train` writes a checkpoint under a temporary name and
   renames it, so `step-N/` with its `trainer_state.pt` is complete the moment it is visible.
   Another trainer's `checkpoint-N/` counts once it holds a weights file, its config and
   `trainer_state.json` (which HF's Trainer writes last), and, while watching, once its files'
   sizes and times are the same on two polls in a row (`Stability`).
3) The base model is the `model` an evalkit run recorded in train_args.json (none: the packaged
   default); other runs have none unless given. `best/` is taken when the run has finished
   (result.json) or when not watching; its step is result.json's `best_step`.
4) A run has finished when result.json exists (evalkit train writes it last). While watching, a
   target that is not (yet) a run or model folder is waited for.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalkit.errors import EvalkitError

_STEP = re.compile(r"^(?:step|checkpoint)-(\d+)$")
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
            "pytorch_model.bin.index.json")  # fmt: skip


@dataclass(frozen=True)
class Candidate:
    """One model of a sweep: where it is, what to call it, which training step it is."""

    label: str
    path: Path
    step: int | None
    role: str  # base | checkpoint | best | model


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("modules.json", "config.json"))


def is_run_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    markers = ("train_args.json", "result.json", "checkpoints")
    return any((path / m).exists() for m in markers) or any(_trainer_checkpoints(path))


def run_finished(path: Path) -> bool:
    return (path / "result.json").is_file()


def _trainer_checkpoints(run: Path):
    for p in run.iterdir() if run.is_dir() else ():
        m = _STEP.match(p.name)
        if m and p.name.startswith("checkpoint-") and p.is_dir():
            yield int(m.group(1)), p


def _complete_trainer_checkpoint(path: Path) -> bool:
    has_weights = any((path / w).is_file() for w in _WEIGHTS)
    has_config = (path / "config.json").is_file() or (path / "modules.json").is_file()
    return has_weights and has_config and (path / "trainer_state.json").is_file()


def snapshot(path: Path) -> tuple:
    """(relative name, size, mtime_ns) of every file under `path`: equal on two polls = settled."""
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            entries.append(
                (os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns)
            )
    return tuple(entries)


class Stability:
    """Remembers each folder's snapshot; a folder is settled once two consecutive polls agree."""

    def __init__(self) -> None:
        self._last: dict[Path, tuple] = {}

    def settled(self, path: Path) -> bool:
        now = snapshot(path)
        before = self._last.get(path)
        self._last[path] = now
        return before == now


def checkpoints(run: Path, stability: Stability | None = None) -> list[Candidate]:
    """The run's complete checkpoints, by step (see the module docstring)."""
    found: dict[int, Candidate] = {}
    root = run / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP.match(p.name)
            if m and p.name.startswith("step-") and (p / "trainer_state.pt").is_file():
                found[int(m.group(1))] = Candidate(
                    p.name, p / "model", int(m.group(1)), "checkpoint"
                )
    for step, p in _trainer_checkpoints(run):
        if step in found or not _complete_trainer_checkpoint(p):
            continue
        if stability is not None and not stability.settled(p):
            continue
        found[step] = Candidate(p.name, p, step, "checkpoint")
    return [found[s] for s in sorted(found)]


def recorded_base(run: Path) -> str | None | bool:
    """The base model an evalkit run recorded (None = the packaged default); False if unknown."""
    try:
        args = json.loads((run / "train_args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return args.get("model") if isinstance(args, dict) else False


def best(run: Path) -> Candidate | None:
    path = run / "best"
    if not is_model_dir(path):
        return None
    step = None
    try:
        step = json.loads((run / "result.json").read_text(encoding="utf-8")).get("best_step")
    except (OSError, ValueError, AttributeError):
        pass
    return Candidate("best", path, step if isinstance(step, int) else None, "best")


def base_candidate(base: Any) -> Candidate:
    from evalkit.embed.models import resolve_model_path

    path = Path(resolve_model_path(base))
    if not is_model_dir(path):
        raise EvalkitError(
            f"base model {base!r} is not a model folder here ({path}); give --base MODEL, or "
            "--base none to sweep without one"
        )
    return Candidate("base", path, 0, "base")


def plan(
    targets: list[Any],
    *,
    base: Any = False,
    watching: bool = False,
    stability: Stability | None = None,
) -> tuple[list[Candidate], bool]:
    """-> (candidates in evaluation order: base, checkpoints by step, best, models; whether every
    run target has finished). `base`: a model, None (packaged default), False (the one recorded
    by the run, if any) or "none"."""
    out: list[Candidate] = []
    finished = True
    runs = [Path(t) for t in targets if is_run_dir(Path(t))]
    if base is False and len(runs) == 1 and recorded_base(runs[0]) is not False:
        base = recorded_base(runs[0])
    if base is not False and base != "none":
        out.append(base_candidate(base))
    for target in targets:
        path = Path(target)
        if path in runs:
            done = run_finished(path)  # before listing: the last checkpoint precedes result.json
            out += checkpoints(path, stability if watching else None)
            finished = finished and done
            b = best(path) if (done or not watching) else None
            if b is not None:
                out.append(b)
        elif is_model_dir(path):
            out.append(Candidate(path.name or str(path), path, None, "model"))
        elif watching:  # a run that has not started writing yet
            finished = False
        else:
            raise EvalkitError(
                f"{target} is neither a training run folder (checkpoints/, checkpoint-N/, "
                "train_args.json) nor a model folder (modules.json / config.json)"
            )
    if len(runs) > 1:  # several runs: label checkpoints by run too
        out = [_prefixed(c) if c.role in ("checkpoint", "best") else c for c in out]
    return out, finished


def _prefixed(c: Candidate) -> Candidate:
    run = c.path.parents[2] if c.path.name == "model" else c.path.parent
    return Candidate(f"{run.name}/{c.label}", c.path, c.step, c.role)
