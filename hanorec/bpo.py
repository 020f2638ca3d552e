"""BPO — blind preference optimization (MMSafe-PO, arXiv 2503.14189): blind negatives.

    python -m hanorec.bpo generate --config configs/demo.yaml --checkpoint runs/demo/sft/final \\
        [--bpo-out runs/demo/bpo/blind]
    accelerate launch -m hanorec.dpo --config configs/demo.yaml \\
        --blind-negatives runs/demo/bpo/blind

BPO's idea: an MLLM that can answer as well **without** looking at the image relies on its
language prior, not on the image. The model answers every preference prompt with its images
(and their tokens) removed; that "blind" answer becomes a rejected response, so DPO pushes the
policy towards answers grounded in the image: for a prompt ``x`` with images, chosen ``y_w``
and blind answer ``y_b = argmax π_SFT(· | x without images)``, the pair ``(y_w, y_b)`` enters
the usual DPO objective on the **full** prompt ``x``. In recommendation the blind answer is
mapped to the item it names: the item the model would pick from the titles alone.

``generate`` reads the recipe's ``data``, ``model``, ``prompt``, ``dpo`` and ``bpo`` sections. The
rows are the training pairs the DPO stage uses (``dpo.dpo_protocols``; the same seeded subset
when ``dpo.max_train_pairs`` is set). Each prompt is rendered blind (``with_images=False``: no
image entries, so no image tokens and no pixel values), answered greedily (or sampled with
``--bpo-sample true``) in left-padded batches — or, with ``--bpo-pick score``, the blind pick
is the candidate of highest blind likelihood (one prompt pass per batch, as the evaluator
scores candidates) — and the answer is mapped with
:func:`hanorec.metrics.match_answer` against the row's candidate titles (``candidates``,
``hit3``), ``Yes``/``No`` (``hit1``) or every catalogue title (``full``). Each answer gets a status:

* ``item`` — it names an item other than the chosen one: a usable blind negative;
* ``chosen`` — it names the chosen item (or, on ``general`` rows, repeats the chosen text):
  skipped, the model already answers right without the image;
* ``text`` — it names no item (kept as text; a usable negative on ``general`` rows only).

The output (``datasets.save_to_disk``, written next to its final name and renamed into place)
has one row per pair: ``row_key`` (joins with the pairs), ``protocol``, ``user_id``,
``chosen``, ``blind_answer``, ``blind_item`` (item id or None) and ``status``; ``manifest.json``
beside it holds the counts, the checkpoint and the generation settings. The format, and how
the DPO stage mixes the answers in, is :mod:`hanorec.data.blind`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from hanorec import config as recipe
from hanorec.cli import ArgumentParser
from hanorec.collate import PromptCollator
from hanorec.data.blind import count_statuses, row_key, write_blind_dataset
from hanorec.data.catalog import Catalog
from hanorec.data.config import DataConfig
from hanorec.data.prompt_config import PromptConfig
from hanorec.data.prompts import ANSWERS, GENERAL, LABELS, response_text
from hanorec.metrics import match_answer, normalize_title
from hanorec.models.config import ModelConfig
from hanorec.models.lineage import load_trained
from hanorec.preference import DPOConfig, load_preference_data
from hanorec.runtime import load_rows, make_collator
from hanorec.scoring import candidate_scores, yes_no_scores

__all__ = ["BPOConfig", "BPORun", "blind_answers", "blind_picks", "blind_records",
           "classify_answer", "count_statuses", "generate", "label_to_title", "main", "row_key",
           "write_blind_dataset"]
USAGE = "usage: python -m hanorec.bpo generate --config RECIPE [--checkpoint DIR] [--bpo-out DIR]"


@dataclass
class BPOConfig:
    """The ``bpo:`` section: how blind answers are generated."""

    checkpoint: str | None = field(default=None, metadata={
        "help": "Model folder answering the blind prompts (default dpo.sft_checkpoint, else "
                "<run_dir>/sft/final): the SFT model, as BPO samples its blind negatives from "
                "the model being aligned."})
    bpo_out: str | None = field(default=None, metadata={
        "help": "Output dataset folder (default <run_dir>/bpo/blind); pass it to hanorec.dpo "
                "--blind-negatives."})
    bpo_batch_size: int = field(default=4, metadata={
        "help": "Blind prompts per generate call (left-padded)."})
    bpo_max_new_tokens: int = field(default=24, metadata={
        "help": "Token budget of a blind answer (a title is short)."})
    bpo_sample: bool = field(default=False, metadata={
        "help": "Sample the blind answers (temperature, top-p) instead of greedy decoding."})
    bpo_temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature (with --bpo-sample true)."})
    bpo_top_p: float = field(default=1.0, metadata={
        "help": "Nucleus sampling mass (with --bpo-sample true)."})
    bpo_pick: Literal["generate", "score"] = field(default="generate", metadata={
        "help": "generate: the blind answer is generated and mapped to an item; score: the "
                "blind pick is the candidate (or Yes/No) with the highest blind likelihood, as "
                "the evaluator scores candidates — for models whose free answers name no item "
                "(candidate protocols and hit1 only)."})


@dataclass
class BPORun:
    run_dir: str = field(default="runs/demo", metadata={
        "help": "Run folder; blind answers go to <run_dir>/bpo/blind by default."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the row subset (as the DPO stage) and of sampling."})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    bpo: BPOConfig = field(default_factory=BPOConfig)


# --------------------------------------------------------------------------- answers → items


def answer_space(row: Mapping[str, Any], catalog: Catalog) -> tuple[Sequence[str], Sequence[str]]:
    """``(answers, their texts)`` a blind answer may name: the row's candidates, Yes/No (hit1),
    nothing (general: free text), else every catalogue item."""
    if row.get("protocol") == GENERAL:
        return [], []
    if row.get("protocol") == "hit1":
        return ANSWERS, ANSWERS
    if "candidates" in row:
        return row["candidates"], [response_text(item, catalog) for item in row["candidates"]]
    return catalog.item_ids, catalog.titles


def classify_answer(answer: str, row: Mapping[str, Any],
                    catalog: Catalog) -> tuple[str | None, str]:
    """``(blind_item, status)`` of one blind answer (statuses in the module docstring).

    Args:
        answer: The generated text.
        row: Its pair row (``protocol``, ``chosen`` and the protocol's fields).
        catalog: Titles by item id.
    """
    space, titles = answer_space(row, catalog)
    if not space:  # general: free text compared with the chosen text
        same = normalize_title(answer) == normalize_title(row["chosen"])
        return None, "chosen" if same else "text"
    index = match_answer(answer, titles)
    if index is None:
        return None, "text"
    item = space[index]
    return item, "chosen" if item == row["chosen"] else "item"


def label_to_title(answer: str, row: Mapping[str, Any], catalog: Catalog) -> str:
    """An index-label answer (``answer: index``) as its candidate's title; other text unchanged."""
    candidates = list(row.get("candidates") or [])
    label = answer.strip().rstrip(".")
    if label in LABELS[: len(candidates)]:
        return response_text(candidates[LABELS.index(label)], catalog)
    return answer


def blind_records(rows: Sequence[Mapping[str, Any]], answers: Sequence[str],
                  catalog: Catalog) -> list[dict[str, Any]]:
    """One output record per (row, blind answer)."""
    if len(rows) != len(answers):
        raise ValueError(f"{len(rows)} rows but {len(answers)} answers")
    records = []
    for row, answer in zip(rows, answers):
        item, status = classify_answer(answer, row, catalog)
        records.append({"row_key": row_key(row), "protocol": row.get("protocol"),
                        "user_id": str(row.get("user_id")),
                        "chosen": row["chosen"], "blind_answer": answer, "blind_item": item,
                        "status": status})
    return records


# --------------------------------------------------------------------------- generation


@torch.no_grad()
def blind_answers(model, collator: PromptCollator, rows: Sequence[Mapping[str, Any]],
                  cfg: BPOConfig, *,
                  seed: int = 0, progress: bool = True) -> list[str]:
    """Answers to the rows' prompts rendered by ``collator`` (blind), greedy or sampled, batched."""
    if collator.with_images:
        raise ValueError("blind answers need a collator with with_images=False")
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": cfg.bpo_temperature,
                "top_p": cfg.bpo_top_p} if cfg.bpo_sample else {"do_sample": False}
    torch.manual_seed(seed)
    answers: list[str] = []
    starts = range(0, len(rows), cfg.bpo_batch_size)
    for start in tqdm(starts, desc="blind answers", disable=not progress):
        chunk = rows[start : start + cfg.bpo_batch_size]
        batch = collator.encode_prompts(chunk, reserve=cfg.bpo_max_new_tokens, padding_side="left")
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        output = model.generate(**batch, max_new_tokens=cfg.bpo_max_new_tokens,
                                pad_token_id=collator.pad_token_id, **sampling)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        answers.extend(t.strip()
                       for t in collator.tokenizer.batch_decode(new_tokens,
                                                                skip_special_tokens=True))
    return answers


def blind_picks(model, collator: PromptCollator, rows: Sequence[Mapping[str, Any]], cfg: BPOConfig,
                *,
                progress: bool = True) -> list[str]:
    """The answer each blind prompt scores highest: the title of the most likely candidate
    (``candidates``, ``hit3``), or ``Yes`` / ``No`` by the sign of ``log π(Yes) − log π(No)``
    (hit1).

    Raises:
        ValueError: A protocol without candidates (``full``, ``general``): use ``generate``.
    """
    if collator.with_images:
        raise ValueError("blind picks need a collator with with_images=False")
    answers = [""] * len(rows)
    for protocol in dict.fromkeys(row.get("protocol") for row in rows):
        ids = [i for i, row in enumerate(rows) if row.get("protocol") == protocol]
        chunk = [rows[i] for i in ids]
        if protocol == "hit1":
            picks = ["Yes" if s >= 0 else "No"
                     for s in yes_no_scores(model, collator, chunk, batch_size=cfg.bpo_batch_size,
                                            progress=progress)]
        elif all("candidates" in row for row in chunk):
            scores = candidate_scores(model, collator, chunk, batch_size=cfg.bpo_batch_size,
                                      progress=progress)
            picks = [response_text(row["candidates"][int(s.argmax())], collator.catalog) for row,
                     s in zip(chunk, scores)]
        else:
            raise ValueError(f"--bpo-pick score needs candidate rows; protocol {protocol!r} has "
                             "none (use --bpo-pick generate)")
        for i, pick in zip(ids, picks):
            answers[i] = pick
    return answers


def generate(run: BPORun) -> Path:
    """Blind answers for the DPO training pairs of ``run``; returns the output folder."""
    cfg = run.bpo
    checkpoint = Path(cfg.checkpoint or run.dpo.sft_checkpoint or Path(run.run_dir) / "sft"
                      / "final")
    out = Path(cfg.bpo_out or Path(run.run_dir) / "bpo" / "blind")
    prepared, catalog = load_preference_data(run, Accelerator(cpu=not torch.cuda.is_available()))
    rows = load_rows(prepared, run.dpo.dpo_protocols, "train", pairs=True,
                     limit=run.dpo.max_train_pairs, seed=run.seed)
    model, processor = load_trained(run.model, checkpoint)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    blind_prompt = replace(run.prompt, with_images=False)
    # rows carry their protocol
    collator = make_collator(processor, catalog, run.dpo.dpo_protocols[0], blind_prompt)
    if collator.style.answer == "head" and cfg.bpo_pick != "score":
        raise ValueError("prompt.answer: head gives no text answers; use --bpo-pick score")
    if cfg.bpo_pick == "score":
        answers = blind_picks(model, collator, rows, cfg)
    else:
        answers = blind_answers(model, collator, rows, cfg, seed=run.seed)
        if collator.style.answer == "index":
            answers = [label_to_title(answer, row, catalog) for answer, row in zip(answers, rows)]
    records = blind_records(rows, answers, catalog)
    meta = {"checkpoint": str(checkpoint), "protocols": list(run.dpo.dpo_protocols),
            "prepared": str(prepared), **asdict(cfg)}
    counts = write_blind_dataset(records, out, meta)
    print(f"blind answers for {counts['rows']} pairs: {counts['item']} mapped to another item "
          "(blind negatives), "
          f"{counts['chosen']} skipped (equal to the chosen item), {counts['text']} kept as "
          f"text (no item named; {counts['empty']} of them blank); written to {out}")
    return out


def main(argv: list[str] | None = None) -> Path | int:
    """``generate``: blind answers for the DPO training pairs; ``--help``: this usage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["generate"]:
        run = recipe.parse(BPORun, argv[1:], prog="hanorec.bpo generate", description=__doc__)
        return generate(run)
    if argv[:1] in (["-h"], ["--help"]):
        ArgumentParser(prog="python -m hanorec.bpo", usage=USAGE.removeprefix("usage: "),
                       description=__doc__, epilog="See `python -m hanorec.bpo generate --help` "
                       "for every flag.").print_help()
        return 0
    raise ValueError(f"{USAGE} (see generate --help)")


if __name__ == "__main__":
    from hanorec.cli import run as run_cli

    run_cli(main)  # user errors: one `error:` line, exit 2
