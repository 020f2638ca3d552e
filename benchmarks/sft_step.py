"""Where an SFT step's time goes, and what each cost lever buys (prints a table).

    python benchmarks/sft_step.py [--config configs/ml100k-smollm2.yaml] [--batch 8] [--steps 3]
        [--threads 2] [--variants recipe,full-titles,...] [--precision fp32|bf16|auto]
        [--out benchmarks/results/sft_step.md]

One SFT step (collate, forward, backward) of the recipe's backbone on real ML-100K rows, per
*variant* of the prompt and model settings, each measured after a warm-up step as the median of
``--steps`` steps, all variants in one process (side by side). The step is split into:

* **image loading** — opening and decoding the posters (PIL), inside collation;
* **collation** — chat template, tokenisation, image processing, item-token ids;
* **vision tower** and **language model** forward (forward hooks on the modules), **LM head /
  ranking head** forward (the rest of the forward), and **backward** (the rest of the step).

Beside the times, each row gives the step's arithmetic: **GFLOP/step** (forward + backward),
**bwd/fwd** (their ratio), **GFLOP/s achieved** (the step's FLOPs over its measured time,
collation and optimizer included; median over the steps), **% of matmul rate** (of this
machine's rate on 2048² matmuls, measured in the same run and precision), **step-shape
GFLOP/s** and **% of step-shape rate** (the rate of one matmul of the step's own MLP shape,
``[tokens in the batch × hidden] @ [hidden × intermediate]``, e.g. ``[~3000 × 576] @ [576 ×
1536]`` for SmolLM2-135M), and **padding** (the fraction of the batch's token positions that
are padding, computed for nothing).

``--precision``: ``fp32``, ``bf16`` (``torch.autocast("cpu", dtype=torch.bfloat16)`` around
collation, forward and loss; backward outside it, as accelerate does for
``mixed_precision: bf16``), or ``auto`` (the default): bf16 where a bf16 matmul measures faster
than fp32 here (:func:`hanorec.hardware.resolve_precision`, the rule of ``mixed_precision:
auto``), fp32 otherwise. The matmul rates are measured in the precision used.

How FLOPs are counted
---------------------

Counted, not estimated: after each timed step the same rows go once more through the step
(forward and loss, then backward; no optimizer step, gradients dropped) under
``torch.utils.flop_counter.FlopCounterMode``, which adds up every matmul, convolution and
attention kernel that actually runs, forward and backward counted apart. Its formulas are the
dense ones: a matmul of ``[m × k] @ [k × n]`` is ``2·m·k·n``, attention is counted as if
unmasked (an upper bound under a causal mask), and elementwise work (norms, activations,
softmax, the optimizer) is not counted. torch has no formula for its CPU attention kernel
(``_scaled_dot_product_flash_attention_for_cpu`` and its backward); this script registers
torch's own SDPA formulas for them, so attention is not silently left out. The count shows
what LoRA does to the backward pass: frozen weights get no weight gradient, so backward is
about one more forward's worth of matmuls (the input gradients), bwd/fwd ≈ 1, where full
fine-tuning would give ≈ 2. The counting pass runs outside the timed step, so it costs time
but does not change the times.

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
``eager-attention``    ``sdpa-attention``: the attention kernel (the recipe: eager)
``bf16-weights``       weights stored in bf16 (``-eager``: with eager attention)
``batch-16``           16 examples per step
``long-history``       50-item histories, titles on the newest 10 (``-eager``: eager attention)
=====================  ===================================================================
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch.utils import flop_counter

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
    "eager-attention": {"model": {"attn_implementation": "eager"}},
    "sdpa-attention": {"model": {"attn_implementation": "sdpa"}},
    "bf16-weights": {"model": {"torch_dtype": "bfloat16"}},
    "bf16-weights-eager": {"model": {"torch_dtype": "bfloat16", "attn_implementation": "eager"}},
    "batch-16": {"sft": {"per_device_batch_size": 16}},
    "long-history": {"data": {"max_history": 50,
                              "output_dir": "{cache}/prepared/ml-100k-smollm2-h50"},
                     "prompt": {"title_budget": 10}},
    "long-history-eager": {"data": {"max_history": 50,
                                    "output_dir": "{cache}/prepared/ml-100k-smollm2-h50"},
                           "prompt": {"title_budget": 10},
                           "model": {"attn_implementation": "eager"}},
}


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


#: torch's SDPA formulas for the CPU attention kernel, which torch's counter has none for.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}


def autocast_for(precision: str) -> AbstractContextManager:
    """The context of the step's forward and loss: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def resolve(requested: str) -> tuple[str, str]:
    """``fp32`` or ``bf16`` for ``--precision``, and the line saying why (``auto``: measured)."""
    from hanorec.hardware import precision_line, resolve_precision

    resolved, ratio = resolve_precision("no" if requested == "fp32" else requested, "cpu")
    return ("bf16" if resolved == "bf16" else "fp32"), precision_line(requested, resolved, ratio)


def matmul_rate(m: int, k: int, n: int, precision: str, repeats: int = 3) -> float:
    """GFLOP/s of ``[m × k] @ [k × n]`` in ``precision`` here: best of ``repeats`` after a
    warm-up (fewer where one matmul takes seconds, as emulated bf16 does)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    start = time.perf_counter()
    a @ b
    best = time.perf_counter() - start
    for _ in range(repeats if best < 2.0 else 1):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def mlp_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(hidden size, MLP intermediate size) of the model's language model."""
    from hanorec.models.families import language_model_and_embeddings

    config = language_model_and_embeddings(model)[0].config
    config = getattr(config, "text_config", None) or config
    return int(config.hidden_size), int(config.intermediate_size)


def count_flops(model, collator, rows, objective, precision: str) -> tuple[float, float]:
    """FLOPs of one step's forward (with the loss) and backward on ``rows``, counted by
    ``FlopCounterMode``; the gradients are dropped afterwards."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as fwd:
        with autocast_for(precision):
            nll, units = objective(model, collator, rows, torch.device("cpu"))
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as bwd:
        (nll / units).backward()
    model.zero_grad(set_to_none=True)
    return float(fwd.get_total_flops()), float(bwd.get_total_flops())


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


def measure(run, prepared, catalog, rows, batch: int, steps: int,
            precision: str = "fp32") -> dict[str, float]:
    """Median seconds per example of each part of the step, tokens per example, and the
    step's counted FLOPs, achieved rate and padding (medians over the timed steps)."""
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
            with autocast_for(precision):
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
                forward, backward = count_flops(model, collator, chunk, sft_objective, precision)
                parts["GFLOP/step"].append((forward + backward) / 1e9)
                parts["bwd/fwd"].append(backward / forward if forward else float("nan"))
                parts["GFLOP/s achieved"].append((forward + backward) / (end - start) / 1e9)
    finally:
        PIL.Image.open = original_open
    out = {name: statistics.median(values) for name, values in parts.items()}
    out["collation"] -= out["image loading"]
    out["head / LM head"] = out.pop("forward") - out["vision tower"] - out["language model"]
    hidden, intermediate = mlp_shape(model)
    out["step-shape GFLOP/s"] = matmul_rate(round(out["positions per batch"]), hidden,
                                            intermediate, precision)
    return out


def collate_and_forward(model, collator, rows, objective, parts):
    """Time collation and the forward of the SFT objective (collation is timed inside it)."""
    real = {"encode_prompts": collator.encode_prompts, "encode_pairs": collator.encode_pairs}
    seconds = {"collation": 0.0, "tokens": 0.0, "positions": 0.0}

    def timed(name):
        def call(*args, **kwargs):
            start = time.perf_counter()
            batch = real[name](*args, **kwargs)
            seconds["collation"] += time.perf_counter() - start
            seconds["tokens"] += float(batch["attention_mask"].sum())
            seconds["positions"] += float(batch["attention_mask"].numel())
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
        parts["padding"].append(1.0 - seconds["tokens"] / max(seconds["positions"], 1.0))
        parts["positions per batch"].append(seconds["positions"])  # padding included
    return nll, units


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ml100k-smollm2.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto",
                        help="fp32, bf16 autocast, or auto: bf16 where it measures faster here")
    parser.add_argument("--out", default="",
                        help="Also write the heading and table to this Markdown file.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision, why = resolve(args.precision)
    print(why, flush=True)
    from dataclasses import replace

    from hanorec import config as recipe
    from hanorec.collab import collab_features
    from hanorec.hardware import describe_machine
    from hanorec.runtime import load_catalog, load_rows
    from hanorec.sft import SFTRun

    base = recipe.parse(SFTRun, ["--config", args.config], prog="sft_step", description="")
    names = [n for n in args.variants.split(",") if n]
    results = {}
    for name in names:
        changes = VARIANTS[name]
        run = replace(base,
                      **{section: replace(getattr(base, section), **values) for section,
                         values in changes.items()})
        batch = args.batch * run.sft.per_device_batch_size // base.sft.per_device_batch_size
        prepared = run.data.path(run.data.output_dir)
        if not (prepared / "manifest.json").is_file():
            from hanorec.data.prepare import prepare

            prepare(run.data)
        catalog = load_catalog(run.data, prepared)
        collab_features(prepared, len(catalog), run.collab)  # trained (or cached) before timing
        rows = load_rows(prepared, ["candidates"], "train", limit=batch * (args.steps + 1),
                         seed=0)
        torch.manual_seed(0)
        results[name] = measure(run, prepared, catalog, rows, batch, args.steps, precision)
        print(f"{name}: {results[name]['step']:.3f} s/example, "
              f"{results[name]['GFLOP/s achieved']:.1f} GFLOP/s", flush=True)
    square = matmul_rate(2048, 2048, 2048, precision)
    heading = (f"SFT step of `{args.config}`, seconds per example (median of {args.steps} steps "
               f"of {args.batch} unless the variant sets the batch, after a warm-up; all "
               f"variants in one process); {precision} ({why}); matmul rate {square:.1f} "
               f"GFLOP/s ({precision} 2048², measured in this run); "
               f"{torch.get_num_threads()} threads; {describe_machine()}")
    table = markdown_table(results, square)
    print(f"\n{heading}\n\n{table}")
    if args.out:
        Path(args.out).write_text(f"# Where an SFT step's time goes (`python "
                                  f"benchmarks/sft_step.py`)\n\n{heading}\n\n{table}\n")


def markdown_table(results: dict[str, dict[str, float]], square: float) -> str:
    """The Markdown table: the existing time columns, then the FLOP columns, then vs recipe."""
    times = ["step", "image loading", "collation", "vision tower", "language model",
             "head / LM head", "backward + optimizer"]
    flops = ["GFLOP/step", "bwd/fwd", "GFLOP/s achieved", "% of matmul rate",
             "step-shape GFLOP/s", "% of step-shape rate", "padding"]
    lines = ["| variant | tokens | " + " | ".join(times + flops) + " | vs recipe |",
             "|---|" + "---:|" * (len(times) + len(flops) + 2)]
    reference = results.get("recipe", next(iter(results.values())))["step"]
    for name, v in results.items():
        achieved = v["GFLOP/s achieved"]
        cells = ([f"{v['tokens']:.0f}"] + [f"{v[c]:.3f}" for c in times]
                 + [f"{v['GFLOP/step']:.1f}", f"{v['bwd/fwd']:.2f}", f"{achieved:.1f}",
                    f"{100 * achieved / square:.0f}%", f"{v['step-shape GFLOP/s']:.1f}",
                    f"{100 * achieved / v['step-shape GFLOP/s']:.0f}%",
                    f"{100 * v['padding']:.0f}%"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {v['step'] / reference:.2f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
