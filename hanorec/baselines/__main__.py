"""Evaluate the classic baselines (most-popular, SASRec) on prepared data.

Usage::

    python -m hanorec.baselines --prepared-dir data/prepared --protocol candidates \\
        --out runs/baselines

Reads the prepared ``datasets`` of ``docs/architecture.md`` (``items/`` and
``<protocol>/{train,validation,test}``) and writes, per model, ``OUT/<model>/per_user.jsonl``
(one JSON object per user: ``user_id`` plus every per-user metric), ``OUT/<model>/summary.json``
(mean and 95% bootstrap interval over users per metric, training time, settings), and
``OUT/comparison.json`` + ``OUT/report.md`` (SASRec vs. most-popular, paired tests).

``--protocol`` takes several protocols (``--protocol candidates hit1 hit3``): each model is
trained once — SASRec selected on the first protocol's validation rows, from the first
protocol's training sequences (every protocol's rows come from the same split) — and scored on
each protocol, written to ``OUT/<protocol>/<model>/...``. SASRec costs minutes on a CPU; the
quality benchmark used to train it once per protocol.

**Training data (leave-one-out, no leakage).** Prepared rows carry at most ``max_history``
items of history, so each user's training sequence (every item before the validation
target) is rebuilt from the ``train`` split: the first train row's history, then the target
of each following train row of that user (rows are checked to chain: each row's history must
be the tail of the sequence so far, and the validation row's history its tail). When the
rows do not chain (e.g. a split that samples targets), the validation row's history is used
instead and the number of such users is printed. SASRec is trained on these sequences (every
prefix position predicts the next item), selected on the validation rows (input: the
training sequence; the validation target is held out), and tested with the training
sequence plus the validation target as input — the protocol of Kang & McAuley (2018). SASRec
therefore reads up to ``sasrec_max_len`` items, the LLM prompt ``max_history``. The ``full``
protocol masks every item before the target (the rebuilt sequence, not only the row's
truncated ``history``: with ``max_history = 20`` on ML-100K, masking the row history alone
leaves most already-seen popular items in the ranking). Most-popular uses
the ``popularity`` column of ``items/`` (training interactions) when present, else counts
over the same training sequences.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from hanorec.baselines.popularity import MostPopular
from hanorec.baselines.sasrec import SASRec, SASRecConfig
from hanorec.cli import ArgumentParser
from hanorec.data.known import (  # noqa: F401  (re-exported for callers of the old home)
    SplitArrays,
    load_prepared,
    split_arrays,
    test_inputs,
    training_sequences,
)
from hanorec.metrics import PROTOCOL_KS, history_mask, ranking_metrics, roc_auc, target_ranks
from hanorec.report import try_write_report
from hanorec.stats import bootstrap_auc, compare_runs, summarize

SELECTION_METRIC = {"candidates": "NDCG@10", "hit3": "NDCG@3", "full": "NDCG@10", "hit1": "AUC"}


def score_split(model: MostPopular | SASRec, split: SplitArrays, protocol: str) -> np.ndarray:
    """Model scores: ``[U, C]`` candidates, ``[U, N]`` full catalogue, ``[U]`` hit1 queries."""
    if protocol == "hit1":
        return model.score(split.model_inputs, split.queries[:, None])[:, 0]
    if protocol == "full":
        if isinstance(model, MostPopular):
            return model.score(split.model_inputs, None, mask_history=False)
        return model.score(split.model_inputs, None)
    return model.score(split.model_inputs, split.candidates)


def per_user_metrics(scores: np.ndarray, split: SplitArrays,
                     protocol: str) -> dict[str, np.ndarray]:
    """Per-user metric arrays for one protocol (hit1: the score and label per user)."""
    if protocol == "hit1":
        return {"score": scores, "label": split.labels.astype(np.float64)}
    if protocol == "full":
        mask = history_mask(split.model_inputs, scores.shape[1], keep=split.targets)
        ranks = target_ranks(scores, split.targets, mask=mask)
    else:
        ranks = target_ranks(scores, split.target_index)
    return ranking_metrics(ranks, PROTOCOL_KS[protocol])


def selection_score(model: MostPopular | SASRec, split: SplitArrays, protocol: str) -> float:
    """Validation score used for SASRec model selection (higher is better)."""
    metrics = per_user_metrics(score_split(model, split, protocol), split, protocol)
    if protocol == "hit1":
        return roc_auc(metrics["score"], metrics["label"])
    return float(metrics[SELECTION_METRIC[protocol]].mean())


def summarise_run(metrics: dict[str, np.ndarray], split: SplitArrays, protocol: str,
                  n_resamples: int, seed: int) -> dict[str, dict[str, float]]:
    """``{metric: {mean, low, high, n}}``; hit1 reports the AUC with a cluster bootstrap."""
    if protocol == "hit1":
        auc, low, high = bootstrap_auc(metrics["score"], metrics["label"], split.user_ids,
                                       n_resamples=n_resamples, seed=seed)
        return {"AUC": {"mean": auc, "low": low, "high": high, "n": len(split.user_ids)}}
    return summarize(metrics, n_resamples=n_resamples, seed=seed)


def write_run(out: Path, name: str, split: SplitArrays, metrics: dict[str, np.ndarray],
              summary: dict[str, Any]) -> None:
    """Write ``per_user.jsonl`` and ``summary.json`` under ``out/name``."""
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "per_user.jsonl", "w", encoding="utf-8") as handle:
        for u, user_id in enumerate(split.user_ids):
            record = {"user_id": user_id, **{k: float(v[u]) for k, v in metrics.items()}}
            handle.write(json.dumps(record) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


@dataclass
class ProtocolData:
    """One protocol's validation and test rows as arrays, with the SASRec inputs set."""

    protocol: str
    valid: SplitArrays
    test: SplitArrays


def load_protocols(prepared: Path, protocols: Sequence[str]
                   ) -> tuple[list[str], np.ndarray | None, list[list[int]], list[ProtocolData]]:
    """Item ids, popularity counts, training sequences (from the first protocol) and each
    protocol's splits."""
    loaded: list[ProtocolData] = []
    sequences: list[list[int]] = []
    for n, protocol in enumerate(protocols):
        item_ids, popularity, rows = load_prepared(prepared, protocol)
        index = {item_id: i for i, item_id in enumerate(item_ids)}
        where = str(prepared / protocol)
        valid = split_arrays(rows["validation"], index, protocol, f"{where}/validation")
        test = split_arrays(rows["test"], index, protocol, f"{where}/test")
        if n == 0:
            sequences, fallbacks = training_sequences(rows.get("train", []), valid, index,
                                                      f"{where}/train")
            if fallbacks:
                print(f"{fallbacks} of {len(sequences)} users: train rows do not chain, "
                      "training on the validation history instead")
            first_items, first_popularity = item_ids, popularity
        elif item_ids != first_items:
            raise ValueError(f"{where}: its items/ differ from {protocols[0]}'s; prepare both "
                             "protocols in one `hanorec.data prepare` call")
        valid.inputs, test.inputs = sequences, test_inputs(sequences, valid, test)
        loaded.append(ProtocolData(protocol, valid, test))
    return first_items, first_popularity, sequences, loaded


def fit_model(name: str, args: argparse.Namespace, sequences: list[list[int]], n_items: int,
              popularity: np.ndarray | None, selection: ProtocolData) -> MostPopular | SASRec:
    """Most-popular from the training counts, or SASRec selected on ``selection``'s
    validation rows."""
    if name == "popularity":
        return (MostPopular().fit_counts(popularity) if popularity is not None
                else MostPopular().fit(sequences, n_items))
    config = SASRecConfig(**{f.name: getattr(args, f.name) for f in fields(SASRecConfig)})
    return SASRec(config).fit(sequences, n_items,
                              validate=lambda m: selection_score(m, selection.valid,
                                                                 selection.protocol),
                              log=print)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train each requested baseline once and evaluate it on every requested protocol.

    Returns ``{model: summary}`` for one protocol, ``{protocol: {model: summary}}`` for several.
    """
    protocols = list(dict.fromkeys(args.protocol))
    prepared, out = Path(args.prepared_dir), Path(args.out)
    item_ids, popularity, sequences, splits = load_protocols(prepared, protocols)
    results: dict[str, dict[str, Any]] = {p: {} for p in protocols}
    per_user: dict[str, dict[str, dict[str, np.ndarray]]] = {p: {} for p in protocols}
    for name in args.models:
        start = time.perf_counter()
        model = fit_model(name, args, sequences, len(item_ids), popularity, splits[0])
        train_seconds = time.perf_counter() - start
        for data in splits:
            protocol, test = data.protocol, data.test
            metrics = per_user_metrics(score_split(model, test, protocol), test, protocol)
            summary = {"model": name, "protocol": protocol, "split": "test",
                       "n_users": len(test.user_ids), "train_seconds": train_seconds,
                       "selected_on": splits[0].protocol,
                       "metrics": summarise_run(metrics, test, protocol, args.n_resamples,
                                                args.seed)}
            if isinstance(model, SASRec):
                summary["config"] = model.config_dict()
                summary["epochs_trained"] = len(model.history)
            write_run(protocol_out(out, protocol, protocols), name, test, metrics, summary)
            results[protocol][name], per_user[protocol][name] = summary, metrics
            print(f"{name} on {protocol}: " + ", ".join(
                f"{k} {v['mean']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"
                for k, v in summary["metrics"].items()))
    for data in splits:
        _compare_and_report(protocol_out(out, data.protocol, protocols), data.protocol,
                            results[data.protocol], per_user[data.protocol], data.test.user_ids,
                            args)
    return results[protocols[0]] if len(protocols) == 1 else results


def protocol_out(out: Path, protocol: str, protocols: Sequence[str]) -> Path:
    """``OUT`` for one protocol, ``OUT/<protocol>`` when several are evaluated."""
    return out if len(protocols) == 1 else out / protocol


def _compare_and_report(out: Path, protocol: str, results: dict[str, Any],
                        per_user: dict[str, dict[str, np.ndarray]], user_ids: list[str],
                        args: argparse.Namespace) -> None:
    rows = None
    if protocol != "hit1" and set(per_user) == {"sasrec", "popularity"}:
        rows = compare_runs(per_user["sasrec"], per_user["popularity"], user_ids, user_ids,
                            n_resamples=args.n_resamples, seed=args.seed)
        for row in rows:
            row.update(run_a="sasrec", run_b="popularity")
        (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    tables = {name: summary["metrics"] for name, summary in results.items()}
    path = try_write_report(out, title=f"Baselines on the {protocol} protocol",
                            metrics_tables=tables, compare_runs=rows)
    if path is not None:  # without matplotlib the JSON outputs are still written
        print(f"report: {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m hanorec.baselines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared-dir", required=True,
                        help="Output dir of `python -m hanorec.data prepare`.")
    parser.add_argument("--protocol", nargs="+", default=["candidates"],
                        choices=["candidates", "hit3", "full", "hit1"],
                        help="One protocol (output in OUT/), or several: each model is trained "
                             "once, selected on the first protocol, and written to "
                             "OUT/<protocol>/.")
    parser.add_argument("--out", required=True,
                        help="Directory for per-user metrics, summaries, report.")
    parser.add_argument("--models", nargs="+", default=["popularity", "sasrec"],
                        choices=["popularity", "sasrec"])
    parser.add_argument("--n-resamples", type=int, default=1000,
                        help="Bootstrap resamples over users.")
    parser.add_argument("--seed", type=int, default=0, help="Bootstrap seed.")
    group = parser.add_argument_group("sasrec")
    for f in fields(SASRecConfig):
        group.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                           help=f.metadata["help"] + f" (default: {f.default})")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


_test_inputs = test_inputs  # the old private name, kept for existing imports


if __name__ == "__main__":
    from hanorec.cli import run as run_cli

    run_cli(main)  # user errors: one `error:` line, exit 2
