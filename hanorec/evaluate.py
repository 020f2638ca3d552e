"""Evaluate a trained checkpoint on the four protocols, with 95% intervals over users.

    python -m hanorec.evaluate --config configs/demo.yaml [--checkpoint PATH]
        [--eval-protocols candidates,hit1,hit3,full] [--eval-split test] [--eval-max-users N]
        [--name NAME] [--generate true] [--blind true]
    python -m hanorec.evaluate compare EVAL_A EVAL_B [--out DIR]

The checkpoint defaults to ``<run_dir>/dpo/final`` when it exists, else ``<run_dir>/sft/final``
(loaded with its whole adapter lineage merged, :func:`hanorec.models.lineage.load_trained`). Output
goes to ``<run_dir>/eval/<name>/`` (``name`` defaults to the checkpoint's stage, e.g. ``dpo``):
``per_user/<protocol>.jsonl`` (one line per user: ``user_id`` and every per-user value),
``summary.json`` (mean and 95% bootstrap interval over users per protocol and metric, timings,
the checkpoint) and ``report.md``.

Protocols (``docs/methods.md``, "Evaluation protocols"; scoring in :mod:`hanorec.scoring`):

* ``hit1`` — score ``log π(Yes|x) − log π(No|x)``; ROC-AUC over all examples
  (:func:`hanorec.metrics.roc_auc`, ties count ½), interval by the cluster bootstrap over users
  (:func:`hanorec.stats.bootstrap_auc`). Per user: the score, the label and the DeLong placement
  value ``AUC_placement`` (its mean over users equals the AUC; ``compare`` pairs on it).
* ``candidates`` / ``hit3`` — likelihood of every candidate's title, one prompt pass shared by
  all candidates; rank of the target with pessimistic ties
  (``rank = 1 + #{c ≠ t : s_c ≥ s_t}``) → HR@1/5/10, NDCG@5/10, MRR (``hit3``: HR@1/3, NDCG@3,
  MRR). With ``generate``, the ``candidates`` prompts are also answered greedily (S-DPO
  convention): ``gen_valid`` = the answer names exactly one candidate title, ``gen_HR@1`` = it
  names the target, both over **all** examples (an invalid answer is a miss). The matching rule
  is :func:`hanorec.metrics.match_answer`: titles and answer are normalised (casefold, collapsed
  whitespace, surrounding quotes and trailing periods removed); an exact match with one title
  wins, otherwise exactly one title must occur in the answer at word boundaries (a title
  contained in another matched title does not count). Answers go to
  ``generated/candidates.jsonl``.
* ``full`` — cosine similarity between the user state (final hidden state at the prompt's last
  token) and every item's state (final hidden state at the end of its item prompt), the whole
  catalogue encoded once; every item of the user's known sequence before the target is masked
  (the sequence rebuilt from the prepared train rows by
  :func:`hanorec.data.known.training_sequences`, plus the validation target for the test
  split; the row's ``history`` when rows do not chain) → HR@5/10/20, NDCG@5/10/20, MRR.

``blind`` (BPO's modality-reliance measure, arXiv 2503.14189): every protocol is evaluated
again with text-only prompts (``per_user/<protocol>-blind.jsonl``); the gap
``with images − without`` per metric is reported with a paired bootstrap interval and p-value.

``compare`` aligns two evaluation folders by user and runs :func:`hanorec.stats.compare_runs`
per protocol and metric (paired bootstrap and Wilcoxon), printing the table and writing
``comparison.json`` and ``comparison.md``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from hanorec import config as recipe
from hanorec.cli import ArgumentParser
from hanorec.collate import PromptCollator
from hanorec.data.config import PROTOCOLS, DataConfig
from hanorec.data.known import known_items, known_sequences
from hanorec.data.prompt_config import PromptConfig
from hanorec.forward import MODES
from hanorec.metrics import (
    PROTOCOL_KS,
    answer_validity,
    auc_contributions,
    full_ranking,
    generated_hit1,
    ranking_metrics,
    target_ranks,
)
from hanorec.models.config import ModelConfig
from hanorec.models.lineage import load_trained
from hanorec.report import try_write_report
from hanorec.runtime import load_catalog, load_rows, make_collator, write_json
from hanorec.scoring import (
    candidate_scores,
    candidate_titles,
    generate_answers,
    head_candidate_scores,
    quick_candidate_hr1,
    scoring_precision,
    yes_no_scores,
)
from hanorec.stats import bootstrap_auc, compare_runs, summarize

__all__ = [
    "EvalConfig",
    "EvalRun",
    "ProtocolResult",
    "compare_folders",
    "evaluate",
    "main",
    "quick_candidate_hr1",
]

NOT_COMPARED = ("score", "label")  # per-user values that are inputs, not metrics


@dataclass
class EvalConfig:
    """The ``eval:`` section."""

    eval_protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS), metadata={
        "help": f"Protocols to evaluate, subset of {PROTOCOLS} (docs/methods.md, 'Evaluation "
                "protocols'); each must be prepared."})
    eval_split: Literal["test", "validation"] = field(default="test", metadata={
        "help": "Split to evaluate (leave-one-out: test = last item, validation = second last)."})
    eval_max_users: int = field(default=0, metadata={
        "help": "Evaluate a seeded subset of this many users per protocol (0: all)."})
    eval_batch_size: int = field(default=4, metadata={"help": "Prompts per forward pass."})
    eval_precision: Literal["fp32", "bf16"] = field(default="fp32", metadata={
        "help": "Run the scoring forwards under bf16 autocast (GPUs, and CPUs with "
                "avx512_bf16/AMX; log-softmax stays fp32). About 2x faster on such CPUs "
                "(benchmarks/candidate_scoring.py); scores move by bf16 rounding, so compare "
                "runs at one precision."})
    checkpoint: str | None = field(default=None, metadata={
        "help": "Model folder with hanorec.json; default <run_dir>/dpo/final if it exists, else "
                "<run_dir>/sft/final."})
    name: str | None = field(default=None, metadata={
        "help": "Output folder <run_dir>/eval/<name>; default the checkpoint's stage (sft, dpo)."})
    length_normalize: bool = field(default=False, metadata={
        "help": "Score candidates by the mean token log-prob of their title instead of the sum."})
    scoring_mode: Literal[MODES] = field(default="auto", metadata={  # type: ignore[valid-type]
        "help": "Shared-prompt path of hanorec.forward.score_candidates (kv: one prompt pass, "
                "candidates branch from its KV cache; duplicate: one sequence per candidate)."})
    candidates_per_pass: int = field(default=0, metadata={
        "help": "Candidates scored per prompt pass (bounds the expanded KV cache); 0: all at "
                "once."})
    item_batch_size: int = field(default=16, metadata={
        "help": "Item prompts per forward when encoding the catalogue (full protocol)."})
    generate: bool = field(default=False, metadata={
        "help": "Also answer the candidates prompts greedily: ValidRatio and generated HR@1 "
                "over all examples (S-DPO / LLaRA)."})
    max_new_tokens: int = field(default=32, metadata={
        "help": "Token budget of a generated answer."})
    bootstrap_resamples: int = field(default=1000, metadata={
        "help": "Bootstrap resamples over users for the 95% intervals and paired tests."})
    blind: bool = field(default=False, metadata={
        "help": "Evaluate again with images removed and report the gap per metric (modality "
                "reliance, BPO arXiv 2503.14189)."})


@dataclass
class EvalRun:
    run_dir: str = field(default="runs/demo", metadata={
        "help": "Run folder; evaluation writes to <run_dir>/eval/<name>."})
    seed: int = field(default=0, metadata={"help": "Seed of the user subset and of the bootstrap."})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class ProtocolResult:
    """Per-user values and their summary for one protocol (and image setting)."""

    user_ids: list[str]
    per_user: dict[str, np.ndarray]
    summary: dict[str, dict[str, float]]
    seconds: float
    records: list[dict[str, Any]] = field(default_factory=list)  # e.g. generated answers


# ------------------------------------------------------------------------------ checks


def check_protocols(protocols: Sequence[str], prepared: Path) -> None:
    """Known and prepared protocols only; the error names the offending one."""
    if not protocols:
        raise ValueError("eval_protocols is empty")
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r} in eval_protocols: choose from "
                             f"{PROTOCOLS}")
        if not (prepared / protocol).is_dir():
            raise ValueError(f"protocol {protocol!r} is not prepared in {prepared}: add it to the "
                             "data section's protocols and run `python -m hanorec.data prepare`")


def resolve_checkpoint(run_dir: str | Path, checkpoint: str | None) -> Path:
    """The explicit checkpoint, else ``dpo/final``, else ``sft/final`` (with a hanorec.json)."""
    if checkpoint:
        path = Path(checkpoint)
    else:
        dpo = Path(run_dir) / "dpo" / "final"
        path = dpo if dpo.is_dir() else Path(run_dir) / "sft" / "final"
    if not (path / "hanorec.json").is_file():
        raise ValueError(f"checkpoint {path} does not exist or has no hanorec.json: train a stage "
                         "first or pass --checkpoint with a stage's final folder")
    return path


def stage_name(checkpoint: Path) -> str:
    """``runs/x/dpo/final`` → ``dpo``; any other folder → its own name."""
    return checkpoint.parent.name if checkpoint.name == "final" else checkpoint.name


# ------------------------------------------------------------------------------ protocols


def _summary(per_user: dict[str, np.ndarray], cfg: EvalConfig,
             seed: int) -> dict[str, dict[str, float]]:
    return summarize(per_user, n_resamples=cfg.bootstrap_resamples, seed=seed)


def eval_ranking(model, collator: PromptCollator, rows: list[dict], protocol: str,
                 cfg: EvalConfig, seed: int, state_cache: dict | None = None) -> ProtocolResult:
    """``candidates`` / ``hit3``: ranking by the read-out's scores (+ greedy answers)."""
    start = time.perf_counter()
    scores = candidate_scores(model, collator, rows, batch_size=cfg.eval_batch_size,
                              length_normalize=cfg.length_normalize, mode=cfg.scoring_mode,
                              candidates_per_pass=cfg.candidates_per_pass or None,
                              state_cache=state_cache)
    targets = [int(row["target_index"]) for row in rows]
    per_user = ranking_metrics(target_ranks(scores, targets), PROTOCOL_KS[protocol])
    records: list[dict[str, Any]] = []
    if cfg.generate and protocol == "candidates" and collator.style.answer != "head":
        answers = generate_answers(model, collator, rows, batch_size=cfg.eval_batch_size,
                                   max_new_tokens=cfg.max_new_tokens)
        titles = [candidate_titles(collator, row) for row in rows]
        per_user["gen_valid"] = answer_validity(answers, titles)
        per_user["gen_HR@1"] = generated_hit1(answers, titles, targets)
        records = [{"user_id": str(row["user_id"]), "answer": answer,
                    "target": titles[n][targets[n]]}
                   for n, (row, answer) in enumerate(zip(rows, answers))]
    return ProtocolResult([str(r["user_id"]) for r in rows], per_user,
                          _summary(per_user, cfg, seed), time.perf_counter() - start, records)


def eval_hit1(model, collator: PromptCollator, rows: list[dict], cfg: EvalConfig, seed: int,
              state_cache: dict | None = None) -> ProtocolResult:
    """``hit1``: AUC of the Yes/No log-odds (the head: the query's log-probability) over all
    examples, cluster bootstrap over users."""
    start = time.perf_counter()
    scores = yes_no_scores(model, collator, rows, batch_size=cfg.eval_batch_size,
                           mode=cfg.scoring_mode, state_cache=state_cache)
    labels = np.array([int(row["label"]) for row in rows], dtype=np.float64)
    user_ids = [str(r["user_id"]) for r in rows]
    auc, low, high = bootstrap_auc(scores, labels, user_ids, n_resamples=cfg.bootstrap_resamples,
                                   seed=seed)
    per_user = {"score": scores, "label": labels,
                "AUC_placement": auc_contributions(scores, labels)}
    summary = {"AUC": {"mean": auc, "low": low, "high": high, "n": len(rows)}}
    return ProtocolResult(user_ids, per_user, summary, time.perf_counter() - start)


def full_ranking_metrics(users: np.ndarray, items: np.ndarray, targets: Sequence[int],
                         sequences: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """HR/NDCG@5/10/20 and MRR of cosine scores ``cos(u, item)`` with the known sequence masked.

    ``score[u, i] = ⟨u/‖u‖, v_i/‖v_i‖⟩``; the items of ``sequences[u]`` are removed from the
    ranking (the target is kept if it repeats an earlier item); ties pessimistic.
    """
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return full_ranking(unit(users) @ unit(items).T, targets, sequences, PROTOCOL_KS["full"])


def eval_full(model, collator: PromptCollator, rows: list[dict], cfg: EvalConfig, seed: int,
              prepared: Path, cache: dict[Any, Any]) -> ProtocolResult:
    """``full``: rank the whole catalogue, known items masked. The ``head`` read-out scores every
    item from the user's state; otherwise the cosine between the user's final hidden state and
    each item prompt's (the catalogue encoded once per image setting)."""
    from hanorec.scoring import item_states, user_states

    start = time.perf_counter()
    catalog, images = collator.catalog, collator.with_images
    sequences, fallbacks = known_sequences(prepared, cfg.eval_split)
    if fallbacks:
        print(f"full: {fallbacks} users' train rows do not chain; their row history is masked "
              "instead")
    user_ids = [str(r["user_id"]) for r in rows]
    masked = known_items(rows, sequences, catalog.position)
    targets = [catalog.position(row["target"]) for row in rows]
    if collator.style.answer == "head":
        scores = head_candidate_scores(model, collator, rows, batch_size=cfg.eval_batch_size,
                                       catalogue=True,
                                       state_cache=cache.setdefault(("head", images), {}))
        per_user = full_ranking(scores, targets, masked, PROTOCOL_KS["full"])
    else:
        if ("items", images) not in cache:
            cache["items", images] = item_states(model, collator, catalog.item_ids,
                                                 batch_size=cfg.item_batch_size)
        states = user_states(model, collator, rows, batch_size=cfg.eval_batch_size)
        per_user = full_ranking_metrics(states, cache["items", images], targets, masked)
    summary = _summary(per_user, cfg, seed)
    return ProtocolResult(user_ids, per_user, summary, time.perf_counter() - start)


def run_protocol(model, collator: PromptCollator, protocol: str, rows: list[dict],
                 cfg: EvalConfig, seed: int, prepared: Path,
                 cache: dict[Any, Any]) -> ProtocolResult:
    """One protocol's result; ``cache`` shares item and head states across protocols."""
    states = cache.setdefault(("head", collator.with_images), {})
    if protocol == "hit1":
        return eval_hit1(model, collator, rows, cfg, seed, states)
    if protocol == "full":
        return eval_full(model, collator, rows, cfg, seed, prepared, cache)
    return eval_ranking(model, collator, rows, protocol, cfg, seed, states)


# ------------------------------------------------------------------------------ outputs


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_per_user(path: Path, result: ProtocolResult) -> None:
    """One JSON line per user: ``user_id`` and every per-user value."""
    records = [{"user_id": user, **{k: float(v[n]) for k, v in result.per_user.items()}}
               for n, user in enumerate(result.user_ids)]
    _write_jsonl(path, records)


def read_per_user(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """User ids and per-user metric arrays of a ``per_user/*.jsonl`` file (inputs left out)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    if not records:
        raise ValueError(f"{path}: no users")
    names = [k for k in records[0] if k != "user_id" and k not in NOT_COMPARED]
    values = {k: np.array([r[k] for r in records], dtype=np.float64) for k in names}
    return [str(r["user_id"]) for r in records], values


def blind_gap(with_images: ProtocolResult, blind: ProtocolResult, cfg: EvalConfig,
              seed: int) -> list[dict[str, Any]]:
    """Paired ``with images − blind`` rows per metric (:func:`hanorec.stats.compare_runs`)."""
    keep = lambda r: {k: v for k, v in r.per_user.items() if k not in NOT_COMPARED}  # noqa: E731
    rows = compare_runs(keep(with_images), keep(blind), with_images.user_ids, blind.user_ids,
                        n_resamples=cfg.bootstrap_resamples, seed=seed)
    return [{**row, "run_a": "with images", "run_b": "blind"} for row in rows]


def write_outputs(out_dir: Path, results: dict[str, ProtocolResult], gaps: dict[str, list[dict]],
                  meta: dict[str, Any], title: str) -> dict[str, Any]:
    """``per_user/*.jsonl``, ``generated/*.jsonl``, ``summary.json`` and ``report.md``."""
    for key, result in results.items():
        write_per_user(out_dir / "per_user" / f"{key}.jsonl", result)
        if result.records:
            _write_jsonl(out_dir / "generated" / f"{key}.jsonl", result.records)
    flat = {f"{key}/{metric}": value
            for key, result in results.items() for metric, value in result.summary.items()}
    protocols = {key: {"n_users": len(r.user_ids), "seconds": round(r.seconds, 2),
                       "metrics": r.summary} for key, r in results.items()}
    summary = {**meta, "metrics": flat, "protocols": protocols, "blind_gap": gaps}
    write_json(out_dir / "summary.json", summary)
    rows = [{**row, "metric": f"{protocol}/{row['metric']}"}
            for protocol, part in gaps.items() for row in part]
    try_write_report(out_dir, title=title, metrics_tables={meta["name"]: flat},
                     compare_runs=rows or None)
    return summary


# ------------------------------------------------------------------------------ entry points


def evaluate(run: EvalRun) -> Path:
    """Evaluate ``run``'s checkpoint on every configured protocol; returns the output folder."""
    from hanorec.data.prepare import prepare

    cfg, started = run.eval, time.perf_counter()
    if cfg.eval_split not in ("test", "validation"):
        raise ValueError(f"eval_split must be test or validation, got {cfg.eval_split!r}")
    unknown = [p for p in cfg.eval_protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol {unknown[0]!r} in eval_protocols: choose from "
                         f"{PROTOCOLS}")
    checkpoint = resolve_checkpoint(run.run_dir, cfg.checkpoint)
    name = cfg.name or stage_name(checkpoint)
    prepare(run.data, progress=True)
    prepared = run.data.path(run.data.output_dir)
    check_protocols(cfg.eval_protocols, prepared)
    catalog = load_catalog(run.data, prepared)
    model, processor = load_trained(run.model, checkpoint)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    load_seconds = time.perf_counter() - started

    settings = [True, False] if cfg.blind else [True]
    results: dict[str, ProtocolResult] = {}
    gaps: dict[str, list[dict]] = {}
    cache: dict[Any, Any] = {}  # item states and head states, per image setting
    for protocol in cfg.eval_protocols:
        rows = load_rows(prepared, [protocol], cfg.eval_split, limit=cfg.eval_max_users,
                         seed=run.seed)
        for with_images in settings:
            prompt_cfg = replace(run.prompt, with_images=with_images and run.prompt.with_images)
            collator = make_collator(processor, catalog, protocol, prompt_cfg)
            key = protocol if with_images else f"{protocol}-blind"
            with scoring_precision(model, cfg.eval_precision):
                results[key] = run_protocol(model, collator, protocol, rows, cfg, run.seed,
                                            prepared, cache)
            print(f"{key}: " + ", ".join(f"{m} {v['mean']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"
                                         for m, v in results[key].summary.items()))
        if cfg.blind:
            gaps[protocol] = blind_gap(results[protocol], results[f"{protocol}-blind"], cfg,
                                       run.seed)

    out_dir = Path(run.run_dir) / "eval" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe.save_yaml(run, out_dir / "config.yaml")
    seconds = {"load": round(load_seconds, 2), "total": round(time.perf_counter() - started, 2),
               **{k: round(r.seconds, 2) for k, r in results.items()}}
    meta = {"name": name, "checkpoint": str(checkpoint), "split": cfg.eval_split,
            "seconds": seconds}
    write_outputs(out_dir, results, gaps, meta,
                  title=f"Evaluation of {checkpoint} ({cfg.eval_split} split)")
    print(f"evaluation written to {out_dir}")
    return out_dir


def compare_folders(folder_a: str | Path, folder_b: str | Path, *, out: str | Path | None = None,
                    n_resamples: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Paired comparison of two evaluation folders on every protocol file they share.

    Writes ``comparison.json`` and ``comparison.md`` into ``out`` (default ``folder_a``).

    Raises:
        ValueError: a folder without ``per_user/``, or no protocol in common.
    """
    a, b = Path(folder_a), Path(folder_b)
    for folder in (a, b):
        if not (folder / "per_user").is_dir():
            raise ValueError(f"{folder} is not an evaluation folder (no per_user/): pass "
                             "<run_dir>/eval/<name>")
    shared = sorted(p.name for p in (a / "per_user").glob("*.jsonl")
                    if (b / "per_user" / p.name).is_file())
    if not shared:
        raise ValueError(f"{a} and {b} share no evaluated protocol")
    rows = []
    for filename in shared:
        users_a, values_a = read_per_user(a / "per_user" / filename)
        users_b, values_b = read_per_user(b / "per_user" / filename)
        protocol = filename.removesuffix(".jsonl")
        for row in compare_runs(values_a, values_b, users_a, users_b, n_resamples=n_resamples,
                                seed=seed):
            rows.append({"protocol": protocol, **row, "run_a": str(a), "run_b": str(b)})
    target = Path(out) if out else a
    target.mkdir(parents=True, exist_ok=True)
    write_json(target / "comparison.json", {"run_a": str(a), "run_b": str(b), "rows": rows})
    table = comparison_table(rows)
    (target / "comparison.md").write_text(f"# {a} vs. {b}\n\n{table}\n", encoding="utf-8")
    print(table)
    return rows


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: protocol, metric, users, means, difference [95% interval], p-values."""
    lines = ["| protocol | metric | users | A | B | A − B [95% CI] | p (bootstrap) "
             "| p (Wilcoxon) |", "|---|---|---:|---:|---:|---|---:|---:|"]
    lines += [f"| {r['protocol']} | {r['metric']} | {r['n_users']} | {r['mean_a']:.4f} | "
              f"{r['mean_b']:.4f} | {r['diff']:+.4f} [{r['diff_low']:+.4f}, "
              f"{r['diff_high']:+.4f}] | {r['p_bootstrap']:.3g} | {r['p_wilcoxon']:.3g} |"
              for r in rows]
    return "\n".join(lines)


def _compare_main(argv: list[str]) -> list[dict[str, Any]]:
    parser = ArgumentParser(prog="python -m hanorec.evaluate compare",
                            description="Paired comparison of two evaluation folders "
                                        "(<run_dir>/eval/<name>).")
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--out", default=None,
                        help="Folder for comparison.json/.md (default: RUN_A).")
    parser.add_argument("--bootstrap-resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return compare_folders(args.run_a, args.run_b, out=args.out,
                           n_resamples=args.bootstrap_resamples, seed=args.seed)


def main(argv: list[str] | None = None) -> Path | list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return _compare_main(argv[1:])
    return evaluate(recipe.parse(EvalRun, argv, prog="hanorec.evaluate", description=__doc__))


if __name__ == "__main__":
    from hanorec.cli import run as run_cli

    run_cli(main)  # user errors: one `error:` line, exit 2
