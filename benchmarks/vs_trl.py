"""Side by side with TRL: one tiny LLaVA, one set of image-heavy preference pairs, four tools.

What runs (each configuration in its own fresh subprocess, all in one invocation, so the
numbers share the machine's load and the table's header names the machine and threads):

* **TRL** — ``trl.DPOTrainer`` as a TRL user runs it: its own ``DataCollatorForVisionPreference``
  (each prompt and its images processed and run twice, for chosen and rejected), LoRA r 8 through
  ``peft_config``, reference = the adapter disabled, sigmoid DPO. TRL refuses
  ``precompute_ref_log_probs`` for vision data and has one rejected response per prompt.
* **HaNoRecDPOTrainer** — ``hanorec.integrations.trl.HaNoRecDPOTrainer`` on the same dataset
  and arguments (HaNoRec loss: dynamic HaRS, NoDO σ 0.1), with its shared-prompt forward.
* **hanorec.dpo** — the stage's own step: :class:`hanorec.collate.PromptCollator` collation
  (prompt once, ``[B, K+1, R]`` responses), :func:`hanorec.dpo.preference_step` (same HaNoRec
  loss; S-DPO for K = 3), backward and AdamW, with ``--reference frozen`` (adapter disabled,
  a live no-grad forward) and ``--reference precomputed`` (one pass over the pairs first,
  :func:`hanorec.preference.precompute_reference`, outside the timed steps but inside the
  memory window).

Workload, identical for all: the tiny LLaVA of the issue (Llama 256 hidden / 4 layers, CLIP 128
hidden / 2 layers, 64 px, 64 tokens per image), built once from config with seeded weights and
saved as safetensors in a temporary folder that every worker loads; PNG posters written to disk
(decoded from disk at every collation, by every tool); prompts of 5 history items (image +
quoted title) rendered once by :func:`hanorec.data.prompts.build_prompt` and the chat template,
so that every tool sees the same tokens; responses are titles + eos; batch 2 prompts; fp32; no
gradient checkpointing for anyone (TRL defaults it on, which would slow TRL down by ~30%).

Measured: **pairs/s** = pairs per step / the median of the step times after ``--warmup`` steps,
a step being everything between two optimizer steps (collation with image decoding, forwards,
backward, optimizer); a K = 3 row holds 3 (chosen, rejected) pairs on one prompt. **Peak RSS
growth** = the worker's peak resident set size (``ru_maxrss``) at the end minus its value once
model, data and trainer were built (the memory the training steps add; allocator caching
included alike).

    python benchmarks/vs_trl.py                    # 2 threads, 12 timed steps
    python benchmarks/vs_trl.py --quick            # smoke test: 3 timed steps, 1 warm-up
    python benchmarks/vs_trl.py --threads 1 --out vs_trl.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"image_size": 64, "vision_hidden": 128,
         "text_dims": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                       "num_attention_heads": 8, "num_key_value_heads": 4,
                       "max_position_embeddings": 1024}}
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
TOOLS = ("trl", "hanorec-trl", "dpo-frozen", "dpo-precomputed")
LABELS = {"trl": "TRL `DPOTrainer`", "hanorec-trl": "`HaNoRecDPOTrainer` (shared forward)",
          "dpo-frozen": "`hanorec.dpo`, `--reference frozen`",
          "dpo-precomputed": "`hanorec.dpo`, `--reference precomputed`"}
HISTORY, ITEMS, MAX_K = 5, 48, 3


@dataclass(frozen=True)
class Job:
    """One worker: a tool, K rejected responses per prompt, and the shared settings."""

    tool: str
    k: int
    workdir: str
    threads: int = 2
    steps: int = 12
    warmup: int = 2
    batch_size: int = 2

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


# ------------------------------------------------------------------------------ the workload


def build_workload(workdir: Path, rows: int) -> None:
    """Model (safetensors), posters (PNG) and ``pairs.json`` (rows rendered for every tool)."""
    from hanorec.models.tiny import build_tiny_backbone

    build_tiny_backbone("tiny-llava", workdir / "model", seed=0, **SIZES)
    catalog = _posters(workdir / "posters")
    pairs = [_render(catalog, _row(n), workdir / "model") for n in range(rows)]
    (workdir / "pairs.json").write_text(json.dumps(pairs))


def _posters(folder: Path):
    """``ITEMS`` PNG posters (96×72, noise over a colour, so decoding and resizing are real)."""
    import numpy as np
    from PIL import Image

    from hanorec.data.catalog import Catalog

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids, images, titles = [], [], []
    for k in range(ITEMS):
        pixels = rng.integers(0, 256, (72, 96, 3), dtype=np.uint8) // 2 + (k * 5) % 128
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"item{k}.png")
        ids.append(f"item{k}")
        images.append(f"item{k}.png")
        titles.append(f"The {['Lost', 'Dark', 'Red', 'Great'][k % 4]} City of Night {k} "
                      f"({1960 + k})")
    return Catalog(ids, titles, images, image_root=folder, item_noun="movie")


def _row(n: int) -> dict[str, Any]:
    """Pair row ``n``: 5 history items, the next item chosen, 3 others rejected."""
    items = [f"item{(7 * n + j) % ITEMS}" for j in range(HISTORY + 1 + MAX_K)]
    return {"user_id": f"u{n}", "history": items[:HISTORY], "target": items[HISTORY],
            "chosen": items[HISTORY], "rejected": items[HISTORY + 1:], "protocol": "full"}


def _render(catalog, row: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """The row as hanorec reads it plus the same prompt as TRL's standard-format text."""
    from transformers import AutoProcessor

    from hanorec.data.prompts import build_prompt

    processor = _render.__dict__.setdefault("processor", AutoProcessor.from_pretrained(model_dir))
    prompt = build_prompt(row, catalog, "full", image_budget=HISTORY)
    text = processor.apply_chat_template(prompt.messages, add_generation_prompt=True,
                                         tokenize=False) + prompt.suffix
    eos = processor.tokenizer.eos_token
    return {"row": row, "image_root": str(catalog.image_root),
            "titles": {i: catalog.title(i) for i in [*row["history"], row["chosen"],
                                                     *row["rejected"]]},
            "trl": {"prompt": text, "images": [str(p) for p in prompt.image_paths],
                    "chosen": catalog.title(row["chosen"]) + eos,
                    "rejected": [catalog.title(i) + eos for i in row["rejected"]]}}


# ------------------------------------------------------------------------------ the workers


def run_job(job: Job) -> dict[str, float]:
    """Run one configuration in this process; return its step times and memory."""
    import torch

    torch.set_num_threads(job.threads)
    torch.manual_seed(0)
    pairs = json.loads((Path(job.workdir) / "pairs.json").read_text())
    pairs = pairs[: job.total_steps * job.batch_size]
    runner = run_trl if job.tool in ("trl", "hanorec-trl") else run_dpo
    times, baseline = runner(job, pairs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    steps = times[job.warmup:]
    return {"median_s": statistics.median(steps), "min_s": min(steps),
            "pairs_per_step": job.batch_size * job.k, "peak_mb": (peak - baseline) / 1024}


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_trl(job: Job, pairs: list[dict]) -> tuple[list[float], int]:
    """TRL's ``DPOTrainer`` (or HaNoRec's subclass) on the pairs, as a TRL user runs it."""
    import peft
    from datasets import Dataset, Image, List
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback

    folder = Path(job.workdir) / "model"
    data = Dataset.from_dict({key: [p["trl"][key] if key != "rejected" else p["trl"][key][0]
                                    for p in pairs]
                              for key in ("prompt", "images", "chosen", "rejected")})
    data = data.cast_column("images", List(Image()))
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    settings = dict(output_dir=str(Path(job.workdir) / f"out-{job.tool}"), beta=0.1,
                    per_device_train_batch_size=job.batch_size, max_steps=job.total_steps,
                    learning_rate=1e-4, logging_steps=job.total_steps, report_to=[],
                    use_cpu=True, bf16=False, gradient_checkpointing=False,
                    save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    if job.tool == "trl":
        from trl import DPOConfig, DPOTrainer
        trainer_cls, args = DPOTrainer, DPOConfig(**settings)
    else:
        from hanorec.integrations.trl import HaNoRecDPOConfig, HaNoRecDPOTrainer
        trainer_cls = HaNoRecDPOTrainer
        args = HaNoRecDPOConfig(**settings, hardness="dynamic", noise_std=0.1)

    class StepTimes(TrainerCallback):
        marks: list[float] = []

        def on_train_begin(self, *_args: Any, **_kwargs: Any) -> None:
            self.marks.append(time.perf_counter())

        def on_step_end(self, *_args: Any, **_kwargs: Any) -> None:
            self.marks.append(time.perf_counter())

    clock = StepTimes()
    trainer = trainer_cls(model=model, args=args, train_dataset=data,
                          processing_class=AutoProcessor.from_pretrained(folder),
                          peft_config=peft.LoraConfig(**LORA), callbacks=[clock])
    baseline = _rss_kib()
    trainer.train()
    return [b - a for a, b in zip(clock.marks, clock.marks[1:])], baseline


def run_dpo(job: Job, pairs: list[dict]) -> tuple[list[float], int]:
    """``hanorec.dpo``'s collation and ``preference_step``, backward and AdamW, step by step."""
    import peft
    import torch
    from accelerate import Accelerator
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from hanorec.data.catalog import Catalog
    from hanorec.dpo import DPORun, StepNoise, preference_step
    from hanorec.preference import (
        DPOConfig,
        encode_pairs,
        precompute_reference,
        reference_context,
    )
    from hanorec.runtime import PromptConfig, make_collator

    folder = Path(job.workdir) / "model"
    titles = {i: t for p in pairs for i, t in p["titles"].items()}
    catalog = Catalog(list(titles), list(titles.values()), [f"{i}.png" for i in titles],
                      image_root=pairs[0]["image_root"], item_noun="movie")
    rows = [dict(p["row"], rejected=p["row"]["rejected"][: job.k]) for p in pairs]
    reference = job.tool.removeprefix("dpo-")
    cfg = DPOConfig(loss="sigmoid" if job.k == 1 else "sdpo", beta=0.1, hardness="dynamic",
                    noise="logits", noise_std=0.1, reference=reference)
    run = DPORun(dpo=cfg)
    processor = AutoProcessor.from_pretrained(folder)
    collators = {"full": make_collator(processor, catalog, "full", PromptConfig())}
    model = peft.get_peft_model(LlavaForConditionalGeneration.from_pretrained(folder),
                                peft.LoraConfig(**LORA)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    accelerator = Accelerator(cpu=True)
    noise, lam = StepNoise(0, accelerator), torch.ones(job.batch_size)
    baseline = _rss_kib()
    ref_table = None
    if reference == "precomputed":
        ref_table = precompute_reference(model, collators, rows, job.batch_size, accelerator,
                                         cfg.forward_mode)
    times = []
    for step in range(job.total_steps):
        start = time.perf_counter()
        ids = list(range(step * job.batch_size, (step + 1) * job.batch_size))
        batch = encode_pairs(collators, [rows[i] for i in ids])
        ref = None if ref_table is None else ref_table[ids]
        out = preference_step(model, reference_context(model), batch, None, ref, lam, run,
                              accelerator, noise(step))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times, baseline


# ------------------------------------------------------------------------------ the table


def jobs(args: argparse.Namespace, workdir: Path) -> list[Job]:
    """Every configuration: K = 1 for all four tools, K = 3 where the tool can (hanorec.dpo)."""
    common = dict(workdir=str(workdir), threads=args.threads, steps=args.steps,
                  warmup=args.warmup, batch_size=args.batch_size)
    out = [Job(tool, 1, **common) for tool in TOOLS]
    return out + [Job(tool, 3, **common) for tool in TOOLS if tool.startswith("dpo-")]


def run_in_subprocess(job: Job) -> dict[str, float]:
    """:func:`run_job` in a fresh interpreter with ``job.threads`` threads everywhere."""
    env = dict(os.environ, OMP_NUM_THREADS=str(job.threads), MKL_NUM_THREADS=str(job.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(asdict(job))],
                          capture_output=True, text=True, check=False, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed for {job}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    """CPU model and logical core count, from ``/proc/cpuinfo`` where there is one."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} logical cores"


def table(results: list[tuple[Job, dict[str, float]]], args: argparse.Namespace) -> list[str]:
    """Markdown: pairs/s, ratio to TRL, median step, peak RSS growth and its ratio to TRL."""
    base = next(r for job, r in results if job.tool == "trl")
    base_rate = base["pairs_per_step"] / base["median_s"]
    lines = [f"Machine: {machine()}; torch threads {args.threads}; batch {args.batch_size} "
             f"prompts; median of {args.steps} steps after {args.warmup} warm-up.", "",
             "| tool | K | step (s) | pairs/s | vs TRL | peak RSS growth (MB) | vs TRL |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for job, r in results:
        rate = r["pairs_per_step"] / r["median_s"]
        lines.append(f"| {LABELS[job.tool]} | {job.k} | {r['median_s']:.3f} | {rate:.2f} | "
                     f"{rate / base_rate:.2f}× | {r['peak_mb']:.0f} | "
                     f"{r['peak_mb'] / base['peak_mb']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per step")
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 steps, 1 warm-up")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_job(Job(**json.loads(args.worker)))))
        return
    if args.quick:
        args.steps, args.warmup = 3, 1
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as folder:
        workdir = Path(folder)
        build_workload(workdir, (args.steps + args.warmup) * args.batch_size)
        results = []
        for job in jobs(args, workdir):
            results.append((job, run_in_subprocess(job)))
            print(f"# {job.tool} K={job.k}: {results[-1][1]}", file=sys.stderr, flush=True)
    text = "\n".join(table(results, args))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
