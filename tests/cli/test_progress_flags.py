"""Every command that draws progress bars takes both spellings of "no progress bars".

Guards against a user's `--no-progress` (as `encode`, `convert` and `train` spell it) being refused
by `evaluate`, `ann-check`, ... with a usage error, or the reverse with `--quiet`.
"""

from __future__ import annotations

import argparse

import pytest

from evalkit.cli import build_parser


def _leaf_parsers(parser: argparse.ArgumentParser, path: tuple = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaf_parsers(child, (*path, name))


def _progress_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if {"--quiet", "--no-progress"} & set(a.option_strings)]


LEAVES = [(" ".join(path), p) for path, p in _leaf_parsers(build_parser())]
FLAGGED = [(name, p) for name, p in LEAVES if _progress_actions(p)]


@pytest.mark.parametrize("name,parser", FLAGGED, ids=[n for n, _ in FLAGGED])
def test_quiet_and_no_progress_are_one_flag(name, parser):
    actions = _progress_actions(parser)
    assert len(actions) == 1, f"{name}: --quiet and --no-progress are separate flags"
    assert {"--quiet", "--no-progress"} <= set(actions[0].option_strings), name


def test_the_flagged_commands_are_the_long_running_ones():
    flagged = {n for n, _ in FLAGGED}
    for name in ("convert", "encode", "train", "evaluate pairs", "evaluate retrieval",
                 "ann-check", "sweep", "compare"):  # fmt: skip
        assert name in flagged, f"{name} has no way to switch its progress bars off"


def test_quiet_silences_other_libraries_bars(tiny_model_dir, tmp_path):
    """Guards against: `--quiet` / `--no-progress` still printing transformers' "Loading weights"
    bar (a script that wants a clean stderr gets progress noise)."""
    import os
    import subprocess
    import sys

    data = tmp_path / "pairs.csv"
    data.write_text(
        "a,b,score\nred apple,green apple,0.5\nblue sky,grey sky,0.7\nhot tea,iced tea,0.2\n"
    )

    def stderr(*flags: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
        cmd = [sys.executable, "-m", "evalkit", "evaluate", "pairs", str(data), "--left", "a",
               "--right", "b", "--label", "score", "--model", str(tiny_model_dir), "--no-cache",
               "--no-plots", *flags]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    assert "Loading weights" in stderr(), "the bar this test silences is not drawn at all"
    for flag in ("--quiet", "--no-progress"):
        assert "Loading weights" not in stderr(flag), flag
