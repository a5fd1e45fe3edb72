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
