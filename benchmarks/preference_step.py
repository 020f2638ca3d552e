"""Preference-step cost: shared prompt (encoded once, K+1 responses) vs the duplicated batch.

One step = policy forward of the chosen and K rejected responses (``hanorec.forward``), the
reference log-probs (``frozen``: an extra no-grad forward with the LoRA adapter disabled;
``precomputed`` / ``none``: nothing during the step), the DPO loss (S-DPO for K > 1, which is
DPO at K = 1) and backward. The backbone is a tiny LLaVA (CLIP vision tower + Llama) with
random weights and a LoRA adapter; each prompt is a 5-image history (64 image tokens per
image, ~390 tokens) and the responses are 12-token titles, the shape of a recommendation prompt.

Measurement (CPU, honest on a shared machine): for each (K, reference) three fresh
subprocesses run with ``--threads`` torch threads. Time: one process builds the model once and
alternates the two modes step by step (shared, duplicate, …; one warm-up each), so that load
changes hit both alike; the minimum of ``--steps`` steps per mode is reported (timeit's
convention: on a shared CPU the fastest run is the least disturbed; medians go to stderr).
Memory: one process per mode runs a warm-up and one step of that mode alone; peak memory is
the growth of the process's peak resident set size (``getrusage`` ``ru_maxrss``) over its
value after the model and inputs were built (a precomputed reference pass falls inside the
window; it needs less than a training step), i.e. the extra memory the step needs
(activations, autograd graph, logits; allocator caching included, alike for both modes).
All configurations run in one invocation, so the ratios are side by side. The shared path is
``--shared-mode auto`` (what ``hanorec.dpo`` runs: ``packed`` for a model in training mode);
``kv`` and ``packed`` can be forced.

Why the shared step was below its ideal at 2 threads (issue 20; K = 1, precomputed: 1.35×
against 1.94×), and what changed. Until then ``auto`` trained on the ``kv`` path: the prompt
pass, then the responses on the repeated KV cache — two passes through every layer. Counted
with ``torch.profiler`` on this benchmark's model (K = 1, forward + backward), ``kv`` issues
8,860 aten operators, the duplicated batch 5,261 and ``packed`` (one pass over
``P + (K+1)(R−1)`` tokens with a block mask) 5,224: ``kv`` does half the duplicated batch's
arithmetic in 1.7× its operators, most of them on the 44 response tokens of the second pass.
An operator's fixed cost (dispatch, autograd bookkeeping, the OpenMP fork/join of each parallel
region) does not shrink with threads, so the arithmetic ``kv`` saves shrinks relative to it
at 2 threads — and any other process on the machine makes every fork/join wait for a
descheduled thread, which hurts the path with the most operators most (on this 2-core machine
with another training job running, one 2-thread ``kv`` step took 0.47–0.66 s against 0.33–0.38 s
for ``packed`` and 0.70–0.85 s for the duplicated batch; at 1 thread ``kv`` 0.231 s, ``packed``
0.218 s, duplicated 0.445 s). The reference pass of ``--reference frozen`` is no-grad (no
backward), so the frozen rows suffered less. ``auto`` now takes ``packed`` in training mode
(policy and reference alike) and keeps ``kv`` for eval-mode scoring (many candidates on one
cache: ``benchmarks/candidate_scoring.py``); ``packed`` is as fast or faster than ``kv`` at one
thread for K = 1, 3, 7 here, and needs less memory (no repeated cache kept for the backward).

    python benchmarks/preference_step.py               # K = 1, 3, 7; all reference modes
    python benchmarks/preference_step.py --threads 2   # what a user runs with all the cores
    python benchmarks/preference_step.py --ks 1 --references precomputed --shared-mode kv
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MODES = ("shared", "duplicate")
SHARED_MODES = ("auto", "kv", "packed")
REFERENCES = ("frozen", "precomputed", "none")
IMAGE_TOKEN = 999


@dataclass(frozen=True)
class Setting:
    """One benchmark configuration."""

    num_rejected: int
    reference: str
    mode: str
    batch_size: int = 2
    images: int = 5
    response_tokens: int = 12
    steps: int = 7
    threads: int = 1
    full_params: bool = False
    shared: str = "auto"


def build_model(full_params: bool):
    """Tiny LLaVA: CLIP 64×64 images with 8×8 patches (64 tokens/image) + a 4-layer Llama."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
        projection_dim=128,
    )
    text = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    if full_params:
        return model.train()
    import peft

    lora = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    return peft.get_peft_model(model, lora).train()


def build_batch(setting: Setting):
    """Left-padded prompts (lengths differ by 9 tokens) and right-padded responses."""
    import torch

    gen = torch.Generator().manual_seed(1)
    rows = []
    for b in range(setting.batch_size):
        ids: list[int] = []
        for _ in range(setting.images):
            ids += torch.randint(1, 900, (12,), generator=gen).tolist() + [IMAGE_TOKEN] * 64
        rows.append(ids + torch.randint(1, 900, (10 + 9 * b,), generator=gen).tolist())
    width = max(map(len, rows))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, ids in enumerate(rows):
        input_ids[b, width - len(ids) :], mask[b, width - len(ids) :] = torch.tensor(ids), 1
    pixels = torch.randn(setting.batch_size * setting.images, 3, 64, 64, generator=gen)
    prompt = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels}
    shape = (setting.batch_size, setting.num_rejected + 1, setting.response_tokens)
    responses = torch.randint(1, 900, shape, generator=gen)
    responses[:, :, -2:] = -100  # titles of 10 tokens, padded to 12
    responses[:, 0, -3:] = -100
    return prompt, responses


def make_step(model, prompt, responses, setting: Setting, mode: str):
    """A closure running one preference step in ``mode``; returns its wall time (s)."""
    import contextlib

    import torch

    from hanorec.forward import response_logps
    from hanorec.losses import preference_loss

    no_adapter = getattr(model, "disable_adapter", contextlib.nullcontext)
    k = setting.num_rejected
    mode = setting.shared if mode == "shared" else mode

    def reference_logps():
        with torch.no_grad(), no_adapter():
            return response_logps(model, prompt, responses, mode=mode)

    precomputed = reference_logps() if setting.reference == "precomputed" else None

    def step() -> float:
        start = time.perf_counter()
        logps = response_logps(model, prompt, responses, mode=mode)
        ref = reference_logps() if setting.reference == "frozen" else precomputed
        kwargs = {"loss_type": "sdpo" if k > 1 else "sigmoid", "beta": 0.1}
        if ref is not None:
            kwargs.update(
                ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1:] if k > 1 else ref[:, 1]
            )
        loss = preference_loss(logps[:, 0], logps[:, 1:] if k > 1 else logps[:, 1], **kwargs).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def run_setting(setting: Setting) -> dict[str, float]:
    """One worker. ``mode`` ``shared``/``duplicate``: peak RSS growth (MB) over a warm-up and one
    step of that mode alone. ``mode`` ``both``: median step times of the two modes, run in
    alternation (shared, duplicate, shared, …) so that load changes on the machine hit both
    alike."""
    import torch

    torch.set_num_threads(setting.threads)
    model = build_model(setting.full_params)
    prompt, responses = build_batch(setting)
    info = {
        "prompt_tokens": int(prompt["attention_mask"].sum(-1).max()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if setting.mode != "both":
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step = make_step(model, prompt, responses, setting, setting.mode)  # may precompute
        step()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return dict(info, peak_mb=(peak - before) / 1024)  # ru_maxrss is in KiB on Linux
    steps = {mode: make_step(model, prompt, responses, setting, mode) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for mode in MODES:
        steps[mode]()  # warm-up
    for _ in range(setting.steps):
        for mode in MODES:
            times[mode].append(steps[mode]())
    best = {f"{mode}_s": min(values) for mode, values in times.items()}
    median = {f"{mode}_median_s": statistics.median(values) for mode, values in times.items()}
    return dict(info, **best, **median)


def run_in_subprocess(setting: Setting) -> dict[str, float]:
    """Run :func:`run_setting` in a fresh interpreter (own peak RSS), return its JSON."""
    command = [sys.executable, __file__, "--worker", json.dumps(asdict(setting))]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {setting}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(args: argparse.Namespace) -> list[str]:
    """Run every configuration and format a Markdown table with shared-vs-duplicate ratios."""
    lines = [
        "| K | reference | dup step (s) | shared step (s) | speed-up | ideal | dup peak (MB) | "
        "shared peak (MB) | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    info = {}
    for k in args.ks:
        for reference in args.references:
            result = {}
            for mode in (*MODES, "both"):
                setting = Setting(
                    k,
                    reference,
                    mode,
                    steps=args.steps,
                    threads=args.threads,
                    full_params=args.full_params,
                    batch_size=args.batch_size,
                    shared=args.shared_mode,
                )
                result[mode] = info = run_in_subprocess(setting)
                print(
                    f"# K={k} reference={reference} mode={mode}: {info}",
                    file=sys.stderr,
                    flush=True,
                )
            ideal = ideal_speedup(
                k, info["prompt_tokens"], Setting(k, reference, "shared").response_tokens
            )
            dup_s, shared_s = result["both"]["duplicate_s"], result["both"]["shared_s"]
            lines.append(
                f"| {k} | {reference} | {dup_s:.3f} | {shared_s:.3f} | {dup_s / shared_s:.2f}× | "
                f"{ideal:.2f}× | "
                f"{result['duplicate']['peak_mb']:.0f} | {result['shared']['peak_mb']:.0f} | "
                f"{result['shared']['peak_mb'] / result['duplicate']['peak_mb']:.2f} |"
            )
    lines.append("")
    lines.append(
        f"prompt ≈ {info.get('prompt_tokens')} tokens (5 images × 64 + text), responses 12 tokens, "
        f"B = {args.batch_size}, trainable params {info.get('trainable')}, "
        f"{'full' if args.full_params else 'LoRA r=8'}, torch threads {args.threads}, "
        f"shared path {args.shared_mode}"
    )
    return lines


def ideal_speedup(k: int, prompt_tokens: int, response_tokens: int) -> float:
    """Token-count bound ``(K+1)(P+R) / (P + (K+1)R)``: the prompt runs once instead of K+1
    times."""
    return (k + 1) * (prompt_tokens + response_tokens) / (prompt_tokens + (k + 1) * response_tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ks", type=int, nargs="+", default=[1, 3, 7], help="numbers of rejected responses K"
    )
    parser.add_argument("--references", nargs="+", default=list(REFERENCES), choices=REFERENCES)
    parser.add_argument(
        "--steps", type=int, default=7, help="timed steps per mode (minimum reported)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per step")
    parser.add_argument(
        "--full-params", action="store_true", help="train all parameters instead of LoRA"
    )
    parser.add_argument(
        "--shared-mode", default="auto", choices=SHARED_MODES,
        help="shared path: auto (what training runs: packed), kv or packed",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        print(json.dumps(run_setting(Setting(**json.loads(args.worker)))))
        return
    print("\n".join(table(args)))


if __name__ == "__main__":
    main()
