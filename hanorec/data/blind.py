"""Blind answers beside the preference pairs: their dataset, and how they become negatives.

BPO (MMSafe-PO, arXiv 2503.14189) answers each preference prompt with its images removed
(``python -m hanorec.bpo generate``); the answer that names another item than the chosen one is
a *blind negative*. This module is the data side of it, the part the DPO stage needs:

* the dataset ``generate`` writes (:func:`write_blind_dataset`, ``datasets.save_to_disk`` next
  to its final name and renamed into place): one row per pair with ``row_key`` (joins with the
  pairs, :func:`row_key`), ``protocol``, ``user_id``, ``chosen``, ``blind_answer``,
  ``blind_item`` (an item id or None) and ``status`` (:data:`STATUSES`), and a
  ``manifest.json`` with the counts (:func:`count_statuses`) and the generation settings;
* :func:`mix_blind_negatives`: a row whose blind answer names an item other than the chosen
  one (or, on ``general`` rows, any non-empty free text) gets it as a negative by **replacing
  its last sampled negative**, so every row keeps the same K (S-DPO's softmax needs equal K per
  batch; pairwise losses then see the blind pair as one of their K pairs). ``ratio`` is the
  seeded fraction of the eligible rows that get theirs; a blind item already among a row's
  negatives changes nothing.

Statuses: ``item`` — the answer names an item other than the chosen one (a usable negative);
``chosen`` — it names the chosen item (or, on ``general`` rows, repeats the chosen text): the
model already answers right without the image; ``text`` — it names no item (a usable negative on
``general`` rows only).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from hanorec.data.prompts import GENERAL

STATUSES = ("item", "text", "chosen")
COLUMNS = ("row_key", "protocol", "user_id", "chosen", "blind_answer", "blind_item", "status")


def row_key(row: Mapping[str, Any]) -> str:
    """A stable key of a pair row: protocol, user, history (or prompt) and chosen answer, hashed."""
    context = row["history"] if "history" in row else [row.get("prompt"), row.get("images")]
    payload = json.dumps([row.get("protocol"), str(row.get("user_id")), context, row["chosen"]],
                         default=str)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()


def count_statuses(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """``{"rows": N, "item": …, "text": …, "chosen": …, "empty": …}`` (``empty``: blank answers,
    a subset of ``text``)."""
    counts = Counter(r["status"] for r in records)
    empty = sum(not r["blind_answer"].strip() for r in records)
    return {"rows": len(records), **{s: counts.get(s, 0) for s in STATUSES}, "empty": empty}


def write_blind_dataset(records: Sequence[Mapping[str, Any]], out_dir: str | Path,
                        meta: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Save records (``save_to_disk``) and ``manifest.json`` atomically; return the counts."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    features = datasets.Features({name: datasets.Value("string") for name in COLUMNS})
    datasets.Dataset.from_list([dict(r) for r in records], features=features).save_to_disk(str(tmp))
    counts = count_statuses(records)
    manifest = json.dumps({"counts": counts, **(meta or {})}, indent=2, default=str)
    (tmp / "manifest.json").write_text(manifest)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(out)
    return counts


def blind_negative(record: Mapping[str, Any] | None, row: Mapping[str, Any]) -> str | None:
    """The negative a pair row gets from its blind record: the item (or general rows' text)."""
    if record is None or record["status"] == "chosen":
        return None
    if record["blind_item"] is not None:
        return record["blind_item"]
    if row.get("protocol") == GENERAL and record["blind_answer"].strip():
        return record["blind_answer"]
    return None


def _read_records(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> list[dict | None]:
    """Each row's blind record (None without one).

    Raises:
        ValueError: A missing folder, or no row has a record.
    """
    if not Path(path).is_dir():
        raise ValueError(f"--blind-negatives {path} does not exist: run "
                         "`python -m hanorec.bpo generate` first")
    table = {r["row_key"]: r for r in datasets.load_from_disk(str(path)).to_list()}
    found = [table.get(row_key(row)) for row in rows]
    if not any(found):
        raise ValueError(f"--blind-negatives {path}: none of the {len(rows)} training pairs has a "
                         "blind answer (generate them with the same recipe, protocols and "
                         "max_train_pairs)")
    return found


def mix_blind_negatives(rows: list[dict[str, Any]], path: str | Path, *, ratio: float = 1.0,
                        seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Give a seeded ``ratio`` of the rows that have a usable blind negative that negative, in
    place of their last sampled one (K unchanged; see the module docstring).

    Returns:
        The new rows and counts: ``rows``, ``with_record``, ``usable``, ``already_rejected``
        (the blind item is already one of the row's negatives: nothing to do), ``replaced``.

    Raises:
        ValueError: ``ratio`` outside [0, 1], a missing folder, or no row matches a record.
    """
    import torch  # the seeded permutation of the rows (torch's, as every stage's subsets)

    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"blind_ratio must be in [0, 1], got {ratio}")
    found = _read_records(path, rows)
    negatives = [blind_negative(rec, row) for rec, row in zip(found, rows)]
    already = [i for i,
               neg in enumerate(negatives) if neg is not None and neg in rows[i]["rejected"]]
    usable = [i for i, neg in enumerate(negatives) if neg is not None and i not in set(already)]
    take = round(ratio * len(usable))
    order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed))[:take]
    out = list(rows)
    for i in sorted(usable[j] for j in order.tolist()):
        out[i] = {**rows[i], "rejected": [*rows[i]["rejected"][:-1], negatives[i]]}
    counts = {"rows": len(rows), "with_record": sum(r is not None for r in found),
              "usable": len(usable), "already_rejected": len(already), "replaced": take}
    print(f"blind negatives: {take} of {len(usable)} usable rows get theirs ({len(already)} "
          f"already a negative; {counts['with_record']} of {len(rows)} pairs have a blind answer)")
    return out, counts
