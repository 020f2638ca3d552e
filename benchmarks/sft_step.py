"""Where an SFT step's time goes, and what each cost lever buys (prints a table).

    python benchmarks/sft_step.py [--config configs/ml100k-smollm2.yaml] [--batch 8] [--steps 3]
        [--threads 2] [--variants recipe,full-titles,...]

One SFT step (collate, forward, backward) of the recipe's backbone on real ML-100K rows, per
*variant* of the prompt and model settings, each measured after a warm-up step as the median of
``--steps`` steps, all variants in one process (side by side). The step is split into:

* **image loading** — opening and decoding the posters (PIL), inside collation;
* **collation** — chat template, tokenisation, image processing, item-token ids;
* **vision tower** and **language model** forward (forward hooks on the modules), **LM head /
  ranking head** forward (the rest of the forward), and **backward** (the rest of the step).

Variants (``recipe`` is the configuration as written; the others change one lever):

=====================  ===================================================================
``recipe``             the recipe as configured
``full-titles``        titles with their year and every word
``default-system``     the chat template's own system prompt
``full-posters``       every poster through the vision tower (one token per patch)
``no-collab``          no item or user tokens
``title-answer``       title read-out (candidates listed, title ⊕ eos scored)
``index-answer``       index read-out (candidates listed with labels)
``checkpointing``      gradient checkpointing on
=====================  ===================================================================
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS: dict[str, dict[str, dict[str, object]]] = {
    "recipe": {},
    "full-titles": {"prompt": {"title_year": True, "title_words": 0}},
    "default-system": {"prompt": {"system_prompt": None}},
    "full-posters": {"prompt": {"image_tokens": "full"}, "model": {"freeze_vision_tower": False}},
    "no-collab": {"prompt": {"item_tokens": False, "user_token": False}},
    "title-answer": {"prompt": {"answer": "title"}},
    "index-answer": {"prompt": {"answer": "index"}},
    "checkpointing": {"model": {"gradient_checkpointing": True}},
}


class Clock:
    """Forward time of named modules (hooks) accumulated per step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[int, float] = {}

    def watch(self, name: str, module: torch.nn.Module) -> None:
        def before(mod, args):
            self._start[id(mod)] = time.perf_counter()

        def after(mod, args, out):
            self.seconds[name] += time.perf_counter() - self._start.pop(id(mod))

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)


def build(run, prepared, catalog):
    """Model (with its item encoder), collator and the SFT objective for ``run``."""
    from hanorec.item_features import attach_for_recipe
    from hanorec.models.families import language_model_and_embeddings, vision_tower
    from hanorec.models.loading import load_backbone
    from hanorec.runtime import make_collator

    model, processor = load_backbone(run.model, for_training=True)
    attach_for_recipe(model, processor, catalog, prepared, run.prompt.style(), run.collab,
                      with_images=run.prompt.with_images, progress=False)
    collator = make_collator(processor, catalog, "candidates", run.prompt)
    clock = Clock()
    clock.watch("vision tower", vision_tower(model))
    clock.watch("language model", language_model_and_embeddings(model)[0])
    return model, collator, clock


def measure(run, prepared, catalog, rows, batch: int, steps: int) -> dict[str, float]:
    """Median seconds per example of each part of the step, and tokens per example."""
    import PIL.Image

    from hanorec.runtime import build_optimizer
    from hanorec.sft import sft_objective

    model, collator, clock = build(run, prepared, catalog)
    optimizer, _ = build_optimizer(model, run.sft, 10)
    loading = {"seconds": 0.0}
    original_open = PIL.Image.open

    def timed_open(*args, **kwargs):
        start = time.perf_counter()
        image = original_open(*args, **kwargs)
        image.load()
        loading["seconds"] += time.perf_counter() - start
        return image

    parts: dict[str, list[float]] = defaultdict(list)
    PIL.Image.open = timed_open
    try:
        for step in range(steps + 1):
            chunk = rows[step * batch : (step + 1) * batch]
            clock.seconds.clear()
            loading["seconds"] = 0.0
            start = time.perf_counter()
            nll, units = collate_and_forward(model, collator, chunk, sft_objective,
                                             parts if step else None)
            forward_end = time.perf_counter()
            (nll / units).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = time.perf_counter()
            if step:  # the first step warms the kernels up
                parts["backward + optimizer"].append((end - forward_end) / batch)
                parts["step"].append((end - start) / batch)
                parts["image loading"].append(loading["seconds"] / batch)
                parts["vision tower"].append(clock.seconds["vision tower"] / batch)
                parts["language model"].append(clock.seconds["language model"] / batch)
    finally:
        PIL.Image.open = original_open
    out = {name: statistics.median(values) for name, values in parts.items()}
    out["collation"] -= out["image loading"]
    out["head / LM head"] = out.pop("forward") - out["vision tower"] - out["language model"]
    return out


def collate_and_forward(model, collator, rows, objective, parts):
    """Time collation and the forward of the SFT objective (collation is timed inside it)."""
    real = {"encode_prompts": collator.encode_prompts, "encode_pairs": collator.encode_pairs}
    seconds = {"collation": 0.0, "tokens": 0.0}

    def timed(name):
        def call(*args, **kwargs):
            start = time.perf_counter()
            batch = real[name](*args, **kwargs)
            seconds["collation"] += time.perf_counter() - start
            seconds["tokens"] += float(batch["attention_mask"].sum())
            return batch
        return call

    collator.encode_prompts, collator.encode_pairs = timed("encode_prompts"), timed("encode_pairs")
    try:
        start = time.perf_counter()
        nll, units = objective(model, collator, rows, torch.device("cpu"))
        total = time.perf_counter() - start
    finally:
        collator.encode_prompts, collator.encode_pairs = (
            real["encode_prompts"],
            real["encode_pairs"],
        )
    if parts is not None:
        parts["collation"].append(seconds["collation"] / len(rows))
        parts["forward"].append((total - seconds["collation"]) / len(rows))
        parts["tokens"].append(seconds["tokens"] / len(rows))
    return nll, units


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ml100k-smollm2.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dataclasses import replace

    from hanorec import config as recipe
    from hanorec.collab import collab_features
    from hanorec.hardware import describe_machine
    from hanorec.runtime import load_catalog, load_rows
    from hanorec.sft import SFTRun

    base = recipe.parse(SFTRun, ["--config", args.config], prog="sft_step", description="")
    prepared = base.data.path(base.data.output_dir)
    catalog = load_catalog(base.data, prepared)
    collab_features(prepared, len(catalog), base.collab)  # trained (or cached) before any timing
    rows = load_rows(prepared, ["candidates"], "train", limit=args.batch * (args.steps + 1), seed=0)
    names = [n for n in args.variants.split(",") if n]
    results = {}
    for name in names:
        changes = VARIANTS[name]
        run = replace(base,
                      **{section: replace(getattr(base, section), **values) for section,
                         values in changes.items()})
        torch.manual_seed(0)
        results[name] = measure(run, prepared, catalog, rows, args.batch, args.steps)
        print(f"{name}: {results[name]['step']:.3f} s/example", flush=True)
    columns = ["tokens", "step", "image loading", "collation", "vision tower", "language model",
               "head / LM head", "backward + optimizer"]
    print(f"\nSFT step, seconds per example (median of {args.steps} steps of {args.batch}, "
          "after a warm-up); "
          f"{torch.get_num_threads()} threads; {describe_machine()}\n")
    print("| variant | " + " | ".join(columns) + " | vs recipe |")
    print("|---|" + "---:|" * (len(columns) + 1))
    reference = results.get("recipe", next(iter(results.values())))["step"]
    for name, values in results.items():
        cells = [f"{values['tokens']:.0f}"] + [f"{values[c]:.3f}" for c in columns[1:]]
        print(f"| {name} | " + " | ".join(cells) + f" | {values['step'] / reference:.2f}× |")


if __name__ == "__main__":
    main()
