"""evalkit.train.fit.fit: gradient accumulation, exact resume, DDP and a real learning signal.

Equivalence tests use a tiny BERT with dropout off (so differently split batches see the same
network) except the resume test, which keeps dropout on: restoring the RNG states must make the
resumed run bit-for-bit the uninterrupted one anyway.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")

from conftest import build_tiny_model_dir  # noqa: E402
from sentence_transformers import InputExample, SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer import losses  # noqa: E402

from evalkit.data.dataset import PairDataset  # noqa: E402
from evalkit.errors import EvalkitError  # noqa: E402
from evalkit.train.fit import EpochBatchSampler, fit  # noqa: E402

WORDS = (
    "a man woman dog cat is are playing eating running guitar piano ball park street red blue "
    "small big old young the on in with near slowly quickly happy sad car train plane bird"
).split()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """The tiny model as built (dropout 0.1) and a copy with dropout switched off."""
    base = build_tiny_model_dir(tmp_path_factory.mktemp("tiny-train"))
    nodrop = base.parent / "nodrop"
    shutil.copytree(base, nodrop)
    config = json.loads((nodrop / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (nodrop / "config.json").write_text(json.dumps(config))
    return {"dropout": base, "nodrop": nodrop}


@pytest.fixture(scope="module")
def pairs_arrow(tmp_path_factory) -> Path:
    """64 synthetic sentence pairs with scores in [0, 1], as a memory-mappable Arrow file."""
    rng = random.Random(0)
    n = 64
    s1 = [" ".join(rng.choices(WORDS, k=rng.randint(3, 9))) for _ in range(n)]
    s2 = [" ".join(rng.choices(WORDS, k=rng.randint(3, 9))) for _ in range(n)]
    score = [rng.random() for _ in range(n)]
    table = pa.table({"s1": s1, "s2": s2, "score": pa.array(score, pa.float32())})
    path = tmp_path_factory.mktemp("pairs") / "pairs.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=16)
    return path


def _load(model_dir: Path) -> SentenceTransformer:
    return SentenceTransformer(str(model_dir), device="cpu")


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _sgd(groups):
    return torch.optim.SGD(groups, lr=1.0)


QUIET = dict(progress=False, device="cpu")


@pytest.mark.parametrize(("n", "world", "shuffle"), [(10, 1, True), (10, 3, True), (9, 2, False)])
def test_epoch_sampler_is_distributed_sampler(n, world, shuffle):
    from torch.utils.data import DistributedSampler

    for rank in range(world):
        ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=5)
        ref.set_epoch(3)
        ours = EpochBatchSampler(
            n, 2, seed=5, epoch=3, rank=rank, world_size=world, shuffle=shuffle
        )
        flat = [i for batch in ours for i in batch]
        assert flat == list(ref)
        skipped = EpochBatchSampler(
            n, 2, seed=5, epoch=3, rank=rank, world_size=world, shuffle=shuffle, start=1
        )
        assert list(skipped) == list(ours)[1:] and len(skipped) == len(ours) - 1


def test_grad_accumulation_matches_one_big_batch(model_dirs, pairs_arrow):
    """k micro-batches x accumulation == one batch of k x size == the gradient computed by hand."""
    data = PairDataset(pairs_arrow, ["s1", "s2"], "score")
    start = _weights(_load(model_dirs["nodrop"]))
    args = dict(max_steps=1, warmup=0, weight_decay=0.0, max_grad_norm=None, optimizer=_sgd, seed=3)
    deltas = []
    for batch_size, accum in [(4, 4), (16, 1)]:
        model = _load(model_dirs["nodrop"])
        fit(
            model,
            data,
            losses.CosineSimilarityLoss(model),
            batch_size=batch_size,
            grad_accum=accum,
            **args,
            **QUIET,
        )
        deltas.append({k: start[k] - v for k, v in _weights(model).items()})
    # SGD with lr=1 moves each weight by exactly its gradient.
    assert _max_diff(deltas[0], deltas[1]) < 1e-6

    model = _load(model_dirs["nodrop"])
    rows = next(iter(EpochBatchSampler(len(data), 16, seed=3)))
    from evalkit.train.fit import Collate

    features, labels = Collate(model)(data.__getitems__(rows))
    losses.CosineSimilarityLoss(model)(features, labels).backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert grads
    assert max(float((grads[k] - deltas[0][k]).abs().max()) for k in grads) < 1e-6


def test_cached_mnrl_matches_mnrl_under_accumulation(model_dirs, pairs_arrow):
    """GradCache replays the forward inside backward; inside our loop (accumulating 2 micro-batches)
    it must give plain MNRL's gradient, up to float32 summation order."""
    data = PairDataset(pairs_arrow, ["s1", "s2"])
    args = dict(
        max_steps=1, batch_size=8, grad_accum=2, warmup=0, optimizer=_sgd, max_grad_norm=None
    )
    start = _weights(_load(model_dirs["nodrop"]))
    grads = []
    for make in (
        lambda m: losses.MultipleNegativesRankingLoss(m),
        lambda m: losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=3),
    ):
        model = _load(model_dirs["nodrop"])
        fit(model, data, make(model), **args, **QUIET)
        grads.append({k: start[k] - v for k, v in _weights(model).items()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_cached_mnrl_runs_under_bf16_autocast(model_dirs, pairs_arrow):
    data = PairDataset(pairs_arrow, ["s1", "s2"])
    model = _load(model_dirs["nodrop"])
    loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)
    result = fit(model, data, loss, max_steps=2, batch_size=8, precision="bf16", **QUIET)
    assert result.precision == "bf16" and result.final_loss == result.final_loss  # not NaN


# 64 rows / batch 6 -> 11 micro-batches -> 6 steps per epoch: step 7 is mid-epoch 2.
RESUME_ARGS = dict(
    max_steps=12, batch_size=6, grad_accum=2, lr=5e-4, warmup=2, checkpoint_every=5, log_every=1
)


@pytest.fixture(scope="module")
def uninterrupted(model_dirs, pairs_arrow, tmp_path_factory):
    """One uninterrupted 12-step run (dropout on): its final weights and its output directory."""
    out = tmp_path_factory.mktemp("resume") / "full"
    model = _load(model_dirs["dropout"])
    data = PairDataset(pairs_arrow, ["s1", "s2"], "score")
    result = fit(model, data, losses.CosineSimilarityLoss(model), out=out, **RESUME_ARGS, **QUIET)
    return result, _weights(model), out


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_resume_ends_with_the_same_weights(
    model_dirs, pairs_arrow, tmp_path, interrupt, uninterrupted
):
    """Interrupted after step 7 (checkpoints every 5; Ctrl-C saves one on the way out) and resumed:
    the same final weights and losses as one uninterrupted run, dropout on, across epochs."""
    data = PairDataset(pairs_arrow, ["s1", "s2"], "score")
    args = RESUME_ARGS
    workers = 1 if interrupt is KeyboardInterrupt else 0
    full, expected, full_dir = uninterrupted

    def stop(record):
        if record["step"] == 7:
            raise interrupt("stop")

    model = _load(model_dirs["dropout"])
    with pytest.raises(interrupt):
        fit(
            model,
            data,
            losses.CosineSimilarityLoss(model),
            out=tmp_path / "cut",
            callback=stop,
            num_workers=workers,
            **args,
            **QUIET,
        )
    saved = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert saved == (["step-5", "step-7"] if interrupt is KeyboardInterrupt else ["step-5"])

    model = _load(model_dirs["dropout"])  # a fresh process would start from the base model too
    with pytest.raises(EvalkitError, match="already holds checkpoints"):
        fit(model, data, losses.CosineSimilarityLoss(model), out=tmp_path / "cut", **args, **QUIET)
    resumed = fit(
        model,
        data,
        losses.CosineSimilarityLoss(model),
        out=tmp_path / "cut",
        resume=True,
        num_workers=workers,
        **args,
        **QUIET,
    )
    assert resumed.steps == full.steps == 12
    assert _max_diff(expected, _weights(model)) < 1e-6
    assert _max_diff(expected, _weights(_load(tmp_path / "cut" / "best"))) < 1e-6

    def losses_of(run):
        lines = (run / "log.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines)]

    cut, uncut = losses_of(tmp_path / "cut"), losses_of(full_dir)
    assert [s for s, _ in cut] == [s for s, _ in uncut] == list(range(1, 13))  # no duplicates
    assert [v for _, v in cut] == pytest.approx([v for _, v in uncut], abs=1e-6)

    with pytest.raises(EvalkitError, match="batch_size"):
        fit(
            model,
            data,
            losses.CosineSimilarityLoss(model),
            out=tmp_path / "cut",
            resume=True,
            **{**args, "batch_size": 5},
            **QUIET,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(model_dirs, pairs_arrow, tmp_path):
    """torchrun, 2 CPU processes (gloo) x batch 4 == 1 process x batch 8, same seed and steps."""
    worker = Path(__file__).with_name("_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(worker), str(model_dirs["nodrop"]), str(pairs_arrow), str(tmp_path / "ddp"), "4", "3",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    model = _load(model_dirs["nodrop"])
    data = PairDataset(pairs_arrow, ["s1", "s2"], "score")
    single = fit(
        model, data, losses.CosineSimilarityLoss(model), max_steps=3, batch_size=8, grad_accum=2,
        lr=1e-3, warmup=1, seed=7, log_every=1, out=tmp_path / "one", **QUIET,
    )  # fmt: skip
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert ddp["world_size"] == 2 and ddp["samples"] == single.samples == 3 * 16
    assert _max_diff(_weights(model), _weights(_load(tmp_path / "ddp" / "best"))) < 1e-6
    # only rank 0 wrote the log: one record per step, with the loss averaged over both ranks
    ddp_log = [
        json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    ]
    one_log = [
        json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in ddp_log] == [1, 2, 3]
    assert [r["loss"] for r in ddp_log] == pytest.approx([r["loss"] for r in one_log], abs=1e-6)


def test_training_on_stsb_improves_dev_spearman(shared_data, model_dirs, tmp_path):
    """A real learning signal: 120 steps on STS-B train lift the tiny model's dev Spearman."""
    import csv

    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    from evalkit.data.convert import convert

    stsb = shared_data / "stsb"
    convert(
        stsb / "stsb-en-train.csv",
        tmp_path / "train.arrow",
        column_names=["s1", "s2", "score"],
        progress=False,
    )
    with open(stsb / "stsb-en-dev.csv", newline="", encoding="utf-8") as f:
        dev = list(csv.reader(f))[:800]
    evaluator = EmbeddingSimilarityEvaluator(
        [r[0] for r in dev], [r[1] for r in dev], [float(r[2]) / 5 for r in dev], name="sts-dev"
    )
    model = _load(model_dirs["dropout"])
    before = evaluator(model)[evaluator.primary_metric]
    data = PairDataset(tmp_path / "train.arrow", ["s1", "s2"], "score")
    result = fit(
        model, data, losses.CosineSimilarityLoss(model), max_steps=120, batch_size=32, lr=1e-3,
        label_scale=5, evaluator=evaluator, eval_every=60, out=tmp_path / "out", **QUIET,
    )  # fmt: skip
    assert result.metric == "sts-dev_spearman_cosine" and result.best_step in (60, 120)
    assert result.best_metric > before + 0.05, (before, result.best_metric)
    best = _load(tmp_path / "out" / "best")  # a plain sentence-transformers model directory
    assert evaluator(best)[evaluator.primary_metric] == pytest.approx(result.best_metric, abs=1e-6)
    evals = [
        r
        for r in map(json.loads, (tmp_path / "out" / "log.jsonl").read_text().splitlines())
        if "eval" in r
    ]
    assert [r["step"] for r in evals] == [60, 120]


def test_in_memory_list_and_argument_errors(model_dirs):
    model = _load(model_dirs["nodrop"])
    examples = [InputExample(texts=["a dog runs", "a dog is running"], label=0.9)] * 10
    loss = losses.CosineSimilarityLoss(model)
    result = fit(model, examples, loss, epochs=2, batch_size=4, log_every=1, **QUIET)
    assert result.steps == 6 and result.epoch == 1 and result.best_dir is None
    with pytest.raises(EvalkitError, match="fp16 needs a CUDA"):
        fit(model, examples, loss, max_steps=1, precision="fp16", **QUIET)
    with pytest.raises(EvalkitError, match="grad_accum"):
        fit(model, examples, loss, max_steps=1, grad_accum=0, **QUIET)
    with pytest.raises(EvalkitError, match="no rows"):
        fit(model, [], loss, max_steps=1, **QUIET)
    with pytest.raises(EvalkitError, match="need an output directory"):
        fit(model, examples, loss, max_steps=1, checkpoint_every=1, **QUIET)


def test_cli_trains_checkpoints_resumes_and_best_evaluates(
    shared_data, model_dirs, tmp_path, capsys
):
    """`evalkit train` on STS-B CSV (converted to OUT/train.arrow, scores auto-scaled by 5), then
    --resume to more steps, then `evalkit evaluate pairs --model OUT/best` on STS-B test."""
    from evalkit.cli import main

    stsb = shared_data / "stsb"
    out = tmp_path / "run"
    common = [
        str(stsb / "stsb-en-train.csv"), "--column-names", "sentence1,sentence2,score",
        "--left", "sentence1", "--right", "sentence2", "--label", "score", "--loss", "cosine",
        "--model", str(model_dirs["dropout"]), "--batch-size", "8", "--checkpoint-every", "2",
        "--out", str(out), "--no-progress", "--log-every", "1",
    ]  # fmt: skip
    assert main(["train", *common, "--max-steps", "2", "--label-scale", "2"]) == 1
    assert (
        "ranges 0..5, 0..2.5 after --label-scale 2; pass --label-scale 5" in capsys.readouterr().err
    )
    assert main(["train", *common, "--max-steps", "4"]) == 0
    err = capsys.readouterr().err
    assert "divided by 5" in err and "best model:" in err
    assert (out / "train.arrow").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]

    eval_args = ["--eval-data", str(stsb / "stsb-en-dev.csv"), "--eval-every", "2"]
    assert main(["train", *common, "--max-steps", "6", "--resume", *eval_args]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 6 and result["metric"] == "eval_spearman_cosine"
    assert result["best_step"] == 6  # the only evaluation after resuming from step 4
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval" in r] == [6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    capsys.readouterr()

    code = main([
        "evaluate", "pairs", str(stsb / "stsb-en-test.csv"), "--column-names", "sentence1,sentence2,score",
        "--left", "sentence1", "--right", "sentence2", "--label", "score", "--model", str(out / "best"),
        "--no-cache", "--out", str(tmp_path / "eval"), "--no-plots", "--quiet",
    ])  # fmt: skip
    assert code == 0
    assert (tmp_path / "eval" / "metrics.json").is_file()
