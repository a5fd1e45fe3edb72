"""Streaming, exact pair metrics that match sentence-transformers' evaluators (v6).

Similarity (``SimilarityMetrics``; EmbeddingSimilarityEvaluator, scipy semantics):
1) ``update`` folds each batch into running float64 moments per score (Chan's parallel update)
   for Pearson, and spills (gold, scores) records to disk;
2) ``compute`` sorts the gold labels on disk, writes their average ranks (ties share the mean
   rank) to a memory-mapped array by arrival position, then for each score sorts on disk, walks
   the sorted run and accumulates the centred rank co-moments: Spearman = Pearson of the ranks.

Classification (``ClassificationMetrics``; BinaryClassificationEvaluator):
1) ``update`` spills (score, label) records to disk;
2) ``compute`` sorts each score on disk from most to least similar (distances ascending) and walks
   the groups of tied scores once: a cut after each group predicts "similar" for everything
   before it; accuracy and F1 keep the first strictly better cut (F1 only cuts with a true
   positive), thresholds are the midpoint of neighbouring scores (kept out of the next group),
   precision/recall are those of the best-F1 cut, MCC is sklearn's at the F1 threshold, AP is
   sklearn's ``average_precision_score`` (step sum over tied groups) and ROC-AUC the
   trapezoid area (ties count half).

RAM is O(batch + sort run) whatever the number of pairs; the records live in a temporary folder.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from evalkit.errors import EvalkitError
from evalkit.metrics._spill import (
    CHUNK_ROWS,
    RUN_ROWS,
    Spill,
    average_ranks,
    external_sort,
    iter_groups,
)

SCORE_NAMES = ("cosine", "dot", "euclidean", "manhattan")
DISTANCES = ("euclidean", "manhattan")  # reported (thresholds) as positive distances, as ST does


def pair_scores(
    emb1: np.ndarray, emb2: np.ndarray, names: Sequence[str] = SCORE_NAMES
) -> dict[str, np.ndarray]:
    """Row-wise scores between two embedding matrices, accumulated in float64 and returned in the
    embeddings' float dtype (float32 stays float32), so a pair's score never depends on its batch.

    cosine = <a/|a|, b/|b|> (norms clamped at 1e-12), dot = <a, b>, euclidean = -|a - b|_2,
    manhattan = -|a - b|_1: larger always means more similar, as sentence-transformers'
    ``pairwise_*`` functions return them.
    """
    a, b = np.asarray(emb1), np.asarray(emb2)
    if a.ndim != 2 or a.shape != b.shape:
        raise EvalkitError(
            f"emb1 and emb2 must be 2-D arrays of one shape; got {a.shape} and {b.shape}"
        )
    dtype = np.result_type(a.dtype, b.dtype, np.float32)
    a, b = a.astype(np.float64), b.astype(np.float64)
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "cosine":
            an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
            bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
            values = np.einsum("ij,ij->i", an, bn)
        elif name == "dot":
            values = np.einsum("ij,ij->i", a, b)
        elif name == "euclidean":
            values = -np.sqrt(np.einsum("ij,ij->i", a - b, a - b))
        elif name == "manhattan":
            values = -np.abs(a - b).sum(axis=1)
        else:
            raise EvalkitError(f"unknown score {name!r}; choose from {', '.join(SCORE_NAMES)}")
        out[name] = values.astype(dtype)
    return out


def _show(value: float) -> str:
    return "NaN" if np.isnan(value) else str(float(value))


def _check_scores(scores: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    if not isinstance(scores, Mapping) or not scores:
        raise EvalkitError("scores must be a non-empty dict of name -> 1-D array (see pair_scores)")
    out = {}
    for name, values in scores.items():
        values = np.asarray(values)
        if values.dtype.kind not in "fiu":
            values = values.astype(np.float64)
        if values.shape != (n,):
            raise EvalkitError(f"scores[{name!r}] has shape {values.shape}; expected ({n},)")
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            i = int(np.argmin(np.isfinite(values)))
            raise EvalkitError(f"scores[{name!r}] contains {_show(values[i])} at row {i}")
        out[name] = values
    return out


class _PairSpill:
    """Shared plumbing: a spill of (label, score per name) records created at the first update."""

    label_dtype: type = np.float64

    def __init__(
        self,
        *,
        directory: str | os.PathLike | None = None,
        run_rows: int = RUN_ROWS,
        chunk_rows: int = CHUNK_ROWS,
    ):
        self.directory = directory
        self.run_rows = run_rows  # records per sorted run held in RAM
        self.chunk_rows = chunk_rows  # records per chunk when merging and scanning
        self.names: tuple[str, ...] | None = None  # merge: must be equal
        self._spill: Spill | None = None  # merge: Spill.merge (concatenate records)

    @property
    def count(self) -> int:
        return self._spill.rows if self._spill is not None else 0

    def _append(self, scores: dict[str, np.ndarray], labels: np.ndarray) -> None:
        if self._spill is None:
            self.names = tuple(scores)
            fields = [("label", self.label_dtype)]
            fields += [(name, np.result_type(v.dtype, np.float32)) for name, v in scores.items()]
            self._spill = Spill(np.dtype(fields), directory=self.directory, run_rows=self.run_rows)
        elif tuple(scores) != self.names:
            raise EvalkitError(
                f"scores have names {list(scores)}; earlier batches had {list(self.names)}"
            )
        records = np.empty(len(labels), dtype=self._spill.dtype)
        records["label"] = labels
        for name, values in scores.items():
            records[name] = values
        self._spill.append(records)

    def _merge_spill(self, other: _PairSpill) -> None:
        if other._spill is None:
            return
        if self._spill is None:
            self.names, self._spill = other.names, other._spill
            return
        if other.names != self.names:
            raise EvalkitError(f"cannot merge metrics over scores {other.names} into {self.names}")
        self._spill.merge(other._spill)

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[Path]:
        """A scratch folder for one compute(), removed afterwards (sorted runs, rank arrays)."""
        assert self._spill is not None
        path = self._spill.tempdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _sorted(
        self, name: str, key_sign: float, directory: Path, extra: Sequence[tuple[str, str]] = ()
    ) -> np.ndarray:
        """Records (key = key_sign * score, pos, extras...) sorted by key on disk in ``directory``."""
        assert self._spill is not None
        directory.mkdir(parents=True, exist_ok=True)
        score_dtype = self._spill.dtype[name]
        dtype = np.dtype(
            [("key", score_dtype), ("pos", np.int64)]
            + [(n, self._spill.dtype[f]) for n, f in extra]
        )

        def chunks():
            pos = 0
            for chunk in self._spill.iter_chunks():
                rec = np.empty(len(chunk), dtype=dtype)
                rec["key"] = (
                    chunk[name] * score_dtype.type(key_sign) if key_sign < 0 else chunk[name]
                )
                rec["pos"] = np.arange(pos, pos + len(chunk))
                for n, f in extra:
                    rec[n] = chunk[f]
                pos += len(chunk)
                yield rec

        return external_sort(
            chunks(),
            "key",
            directory,
            run_rows=self.run_rows,
            chunk_rows=self.chunk_rows,
        )


class SimilarityMetrics(_PairSpill):
    """Pearson and Spearman correlation of each score with gold similarity (scipy semantics).

    ``compute()`` keys: ``pearson_<score>`` and ``spearman_<score>`` for each score name, e.g.
    ``pearson_cosine``, ``spearman_cosine``, ``pearson_dot``, ``spearman_euclidean``; plus
    ``pearson_max``/``spearman_max`` when ``include_max`` and more than one score is given.
    NaN where one side is constant (as scipy returns).
    """

    def __init__(
        self,
        *,
        include_max: bool = False,
        directory: str | os.PathLike | None = None,
        run_rows: int = RUN_ROWS,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        super().__init__(directory=directory, run_rows=run_rows, chunk_rows=chunk_rows)
        self.include_max = include_max
        # running float64 moments per score name: n, mean_x, mean_y, M2x, M2y, Cxy
        self._moments: dict[str, np.ndarray] = {}  # merge: Chan's parallel combination

    def update(self, scores: Mapping[str, np.ndarray], gold: Sequence[float] | np.ndarray) -> None:
        gold = np.asarray(gold, dtype=np.float64).ravel()
        if not np.isfinite(gold).all():  # an inf gold score makes Pearson 1.0 or NaN
            i = int(np.argmin(np.isfinite(gold)))
            raise EvalkitError(f"gold contains {_show(gold[i])} at row {i}; gold must be finite")
        checked = _check_scores(scores, len(gold))
        if len(gold) == 0:
            return
        self._append(checked, gold)
        for name, values in checked.items():
            x = values.astype(np.float64)
            mx, my = x.mean(), gold.mean()
            dx, dy = x - mx, gold - my
            batch = np.array([len(x), mx, my, dx @ dx, dy @ dy, dx @ dy])
            self._moments[name] = _combine(self._moments.get(name), batch)

    def update_embeddings(self, emb1: np.ndarray, emb2: np.ndarray, gold) -> None:
        """``update(pair_scores(emb1, emb2), gold)``."""
        self.update(pair_scores(emb1, emb2), gold)

    def merge(self, other: SimilarityMetrics) -> None:
        self._merge_spill(other)
        for name, m in other._moments.items():
            self._moments[name] = _combine(self._moments.get(name), m)

    def compute(self) -> dict[str, float]:
        if self.count < 2:
            raise EvalkitError(f"similarity metrics need at least 2 pairs; got {self.count}")
        with self._scratch() as work:
            return self._correlations(work)

    def _correlations(self, work: Path) -> dict[str, float]:
        n = self.count
        mid = (n + 1) / 2.0  # mean rank: ranks are centred on it
        # gold average ranks, written by arrival position
        gold_sorted = self._sorted("label", 1.0, work / "gold")
        gold_rank = np.lib.format.open_memmap(
            work / "gold_rank.npy", mode="w+", dtype=np.float64, shape=(n,)
        )
        for start, ranks in average_ranks(gold_sorted["key"], work / "gold", self.chunk_rows):
            gold_rank[np.asarray(gold_sorted["pos"][start : start + len(ranks)])] = ranks - mid
        out: dict[str, float] = {}
        for name in self.names:
            m = self._moments[name]
            out[f"pearson_{name}"] = _corr(m[5], m[3], m[4])
            ranked = self._sorted(name, 1.0, work / name)
            sxx = syy = sxy = 0.0
            for start, ranks in average_ranks(ranked["key"], work / name, self.chunk_rows):
                rx = ranks - mid
                ry = gold_rank[np.asarray(ranked["pos"][start : start + len(ranks)])]
                sxx += float(rx @ rx)
                syy += float(ry @ ry)
                sxy += float(rx @ ry)
            out[f"spearman_{name}"] = _corr(sxy, sxx, syy)
        if self.include_max and len(self.names) > 1:
            out["pearson_max"] = max(out[f"pearson_{n}"] for n in self.names)
            out["spearman_max"] = max(out[f"spearman_{n}"] for n in self.names)
        return out


def _combine(a: np.ndarray | None, b: np.ndarray) -> np.ndarray:
    """Chan et al. parallel update of (n, mean_x, mean_y, M2x, M2y, Cxy)."""
    if a is None or a[0] == 0:
        return b.copy()
    na, nb = a[0], b[0]
    n = na + nb
    dx, dy = b[1] - a[1], b[2] - a[2]
    f = na * nb / n
    return np.array(
        [
            n,
            a[1] + dx * nb / n,
            a[2] + dy * nb / n,
            a[3] + b[3] + dx * dx * f,
            a[4] + b[4] + dy * dy * f,
            a[5] + b[5] + dx * dy * f,
        ]
    )


def _corr(cxy: float, cxx: float, cyy: float) -> float:
    if cxx <= 0 or cyy <= 0:
        return float("nan")
    return float(max(-1.0, min(1.0, cxy / math.sqrt(cxx * cyy))))


class ClassificationMetrics(_PairSpill):
    """Binary pair classification at the best threshold, per score (BinaryClassificationEvaluator).

    ``compute()`` keys per score name s: ``s_accuracy``, ``s_accuracy_threshold``, ``s_f1``,
    ``s_precision``, ``s_recall``, ``s_f1_threshold``, ``s_ap``, ``s_mcc``, ``s_roc_auc``
    (e.g. ``cosine_accuracy``, ``dot_f1``, ``euclidean_ap``, ``manhattan_mcc``). Labels are 0/1.
    Scores are "larger = more similar" (as :func:`pair_scores` gives); for euclidean/manhattan
    the thresholds are reported as positive distances (predict similar when distance <= t), as
    sentence-transformers does. ``include_max`` adds ``max_<metric>`` over scores (ST's names).
    """

    label_dtype = np.int8

    def __init__(
        self,
        *,
        include_max: bool = False,
        directory: str | os.PathLike | None = None,
        run_rows: int = RUN_ROWS,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        super().__init__(directory=directory, run_rows=run_rows, chunk_rows=chunk_rows)
        self.include_max = include_max
        self.positives = 0  # merge: add

    def update(self, scores: Mapping[str, np.ndarray], labels: Sequence[int] | np.ndarray) -> None:
        labels = np.asarray(labels).ravel()
        bad = ~np.isin(labels, (0, 1))
        if bad.any():
            i = int(np.argmax(bad))
            raise EvalkitError(f"labels must be 0 or 1; row {i} has {labels[i].tolist()!r}")
        checked = _check_scores(scores, len(labels))
        if len(labels) == 0:
            return
        self._append(checked, labels.astype(np.int8))
        self.positives += int(labels.astype(np.int64).sum())

    def update_embeddings(self, emb1: np.ndarray, emb2: np.ndarray, labels) -> None:
        """``update(pair_scores(emb1, emb2), labels)``."""
        self.update(pair_scores(emb1, emb2), labels)

    def merge(self, other: ClassificationMetrics) -> None:
        self._merge_spill(other)
        self.positives += other.positives

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise EvalkitError("classification metrics need at least 1 pair; got none")
        out: dict[str, float] = {}
        for name in self.names:
            with self._scratch() as work:
                values = self._scan(name, work)
            out.update({f"{name}_{metric}": v for metric, v in values.items()})
        if self.include_max and len(self.names) > 1:
            for metric in values:
                out[f"max_{metric}"] = max(out[f"{n}_{metric}"] for n in self.names)
        return out

    def _scan(self, name: str, work: Path) -> dict[str, float]:
        """One pass over the pairs sorted from most to least similar (key = distance-like)."""
        n, pos_total = self.count, self.positives
        neg_total = n - pos_total
        rec = self._sorted(name, -1.0, work, extra=[("label", "label")])
        keys_all = rec["key"]
        kt = keys_all.dtype.type
        best_acc = neg_total  # correct predictions when everything is called dissimilar
        acc_thr = np.nextafter(kt(keys_all[0]), kt(-np.inf))
        best_f1, f1_cut, f1_thr = 0.0, None, 0.0
        ap = 0.0
        auc2 = 0.0  # twice the number of (pos, neg) pairs ordered right, ties counted half
        tp_run = 0  # positives seen before the current chunk
        prev_tp, prev_n, prev_recall = 0, 0, 0.0  # at the previous group end
        for start, keys, end in iter_groups(keys_all, self.chunk_rows):
            labels = np.asarray(rec["label"][start : start + len(keys)], dtype=np.int64)
            cum_tp = tp_run + np.cumsum(labels)
            tp_run = int(cum_tp[-1])
            idx = np.flatnonzero(end)
            if not len(idx):
                continue  # one tied group fills the chunk; it ends in a later chunk
            tp = cum_tp[idx]
            cnt = start + idx + 1  # predicted positive (rows up to this cut)
            fp = cnt - tp
            correct = tp + (neg_total - fp)
            j = int(np.argmax(correct))
            if correct[j] > best_acc:
                best_acc = int(correct[j])
                acc_thr = self._threshold(keys_all, start + int(idx[j]), n)
            with np.errstate(divide="ignore", invalid="ignore"):
                precision = tp / cnt
                recall = tp / pos_total if pos_total else np.zeros(len(tp))
                f1 = np.where(tp > 0, 2 * precision * recall / (precision + recall), -np.inf)
            j = int(np.argmax(f1))
            if f1[j] > best_f1:
                best_f1 = float(f1[j])
                f1_cut = (int(tp[j]), int(cnt[j]), float(precision[j]), float(recall[j]))
                f1_thr = self._threshold(keys_all, start + int(idx[j]), n)
            # AP: sum over groups of (recall step) x precision, as sklearn's step integral
            recalls = recall if pos_total else np.ones(len(tp))
            steps = np.diff(np.concatenate([[prev_recall], recalls]))
            ap += float(np.sum(steps * precision))
            # ROC-AUC: each group's negatives rank below the earlier positives, tie half with its own
            tps = np.concatenate([[prev_tp], tp])
            fps = np.concatenate([[prev_n - prev_tp], fp])
            auc2 += float(np.sum(np.diff(fps) * (tps[:-1] + tps[1:]).astype(np.float64)))
            prev_tp, prev_n, prev_recall = int(tp[-1]), int(cnt[-1]), float(recalls[-1])
        sign = 1.0 if name in DISTANCES else -1.0
        # ROC-AUC of a single class is undefined: NaN here, null in every JSON evalkit writes
        out = {
            "accuracy": best_acc / n,
            "accuracy_threshold": float(sign * acc_thr),
            "f1": best_f1,
            "precision": f1_cut[2] if f1_cut else 0.0,
            "recall": f1_cut[3] if f1_cut else 0.0,
            "f1_threshold": float(sign * f1_thr) if f1_cut else 0.0,
            "ap": ap if pos_total else 0.0,
            "mcc": _mcc(f1_cut[0], f1_cut[1], pos_total, n) if f1_cut else 0.0,
            "roc_auc": auc2 / (2.0 * pos_total * neg_total)
            if pos_total and neg_total
            else float("nan"),
        }
        return out

    @staticmethod
    def _threshold(keys: np.ndarray, i: int, n: int):
        """Midpoint between the cut's last key and the next one, never inside the next group."""
        kt = keys.dtype.type
        if i == n - 1:
            return kt(keys[i])
        a, b = kt(keys[i]), kt(keys[i + 1])
        t = (a + b) / kt(2)
        return a if t == b else t


def _mcc(tp: int, predicted: int, positives: int, n: int) -> float:
    """sklearn.metrics.matthews_corrcoef from confusion counts."""
    fp = predicted - tp
    fn = positives - tp
    tn = n - positives - fp
    t_sum = np.array([tn + fp, fn + tp], dtype=np.float64)
    p_sum = np.array([tn + fn, fp + tp], dtype=np.float64)
    n_correct = float(tn + tp)
    cov_ytyp = n_correct * n - t_sum @ p_sum
    cov_ypyp = float(n) ** 2 - p_sum @ p_sum
    cov_ytyt = float(n) ** 2 - t_sum @ t_sum
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))
