"""The quality benchmark's grid: methods, budgets, stages (subprocess calls) and the runner.

Each stage is a subprocess call of the toolkit's own CLIs (``hanorec.data``, ``hanorec.sft``,
``hanorec.dpo``, ``hanorec.evaluate``, ``hanorec.baselines``, ``hanorec.bpo``, ``hanorec.recpo``)
with its own run folder ``<run-root>/seed<k>/<method>/``; a stage whose output exists is skipped,
so an interrupted grid resumes stage by stage. :mod:`benchmarks.quality` is the entry point.

Cost, per stage (``<run-root>/stages.json``): wall time of the subprocess and its CPU time
(user + system, from the same rusage: less sensitive to other load on the machine); its peak
resident memory, ``ru_maxrss`` of the rusage :func:`os.wait4` returns for that child (Linux: the
largest RSS of the child or any descendant it waited for — an honest per-stage peak, not a delta of
a running maximum); optimizer steps from the stage's ``summary.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

EVAL_NAME = "bench"
LLM_PROTOCOLS = ("candidates", "hit1")
HANOREC = ("--loss", "sigmoid", "--reference", "frozen")

# ----------------------------------------------------------------------------- methods and budgets


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: how it trains and what it is evaluated on."""

    name: str
    label: str
    kind: str  # baseline | sft | dpo | bpo | recpo
    flags: tuple[str, ...] = ()
    text_only: bool = False
    module: str | None = None  # the hanorec module the method needs (optional methods)

    def available(self) -> bool:
        """False when the method's module is not (yet) part of the package."""
        return self.module is None or (ROOT / (self.module.replace(".", "/") + ".py")).is_file()


METHODS: tuple[Method, ...] = (
    Method("popularity", "Most popular", "baseline"),
    Method("sasrec", "SASRec", "baseline"),
    Method("sft", "SFT only", "sft"),
    Method("sft-text", "SFT text-only (no images)", "sft", text_only=True),
    Method("dpo", "DPO (sigmoid)", "dpo",
           ("--loss", "sigmoid", "--hardness", "none", "--noise", "none", "--reference", "frozen")),
    Method("sdpo", "S-DPO (K = 3)", "dpo",
           ("--loss", "sdpo", "--hardness", "none", "--noise", "none", "--reference", "frozen")),
    Method("simpo", "SimPO", "dpo",
           ("--loss", "simpo", "--hardness", "none", "--noise", "none", "--reference", "none")),
    Method("hanorec-static", "HaNoRec static (HaRS λ)", "dpo",
           (*HANOREC, "--hardness", "static", "--noise", "none")),
    Method("hanorec-dynamic", "HaNoRec dynamic (HaRS λ·η)", "dpo",
           (*HANOREC, "--hardness", "dynamic", "--noise", "none")),
    Method("hanorec-nodo", "HaNoRec dynamic + NoDO (logits)", "dpo",
           (*HANOREC, "--hardness", "dynamic", "--noise", "logits")),
    Method("hanorec-noref", "HaNoRec + NoDO, no reference", "dpo",
           ("--loss", "sigmoid", "--hardness", "dynamic", "--noise", "logits", "--reference",
            "none")),
    Method("bpo", "HaNoRec + NoDO + BPO blind negatives", "bpo",
           (*HANOREC, "--hardness", "dynamic", "--noise", "logits"),
           module="hanorec.bpo"),
    Method("recpo", "R²ec / RecPO (full catalogue)", "recpo", module="hanorec.recpo"),
)
BY_NAME = {m.name: m for m in METHODS}


@dataclass(frozen=True)
class Budget:
    """Flags that size the grid; ``None`` keeps the recipe's value."""

    sft_steps: int | None
    dpo_steps: int | None
    train_examples: int | None  # SFT rows (and DPO pairs) drawn per run
    eval_users: int | None  # users per protocol and seed (LLM evaluations)
    sasrec_epochs: int
    extra: tuple[str, ...] = ()  # flags passed to every training stage
    # model and prompt flags of every model stage (training, generation, evaluation)
    prompt: tuple[str, ...] = ()
    evaluation: tuple[str, ...] = ()  # flags of the evaluation stages only
    full_users: int | None = None  # users of the full-catalogue evaluation (RecPO)
    # bf16 autocast in training and scoring, only where bf16 is native (hanorec.hardware)
    bf16: bool = False

    def training_flags(self) -> tuple[str, ...]:
        """Flags of every training stage: ``extra``, plus bf16 mixed precision where it is
        native."""
        return (*self.extra, *(("--mixed-precision", "bf16") if self.uses_bf16() else ()))

    def evaluation_flags(self) -> tuple[str, ...]:
        """Flags of every evaluation stage: ``evaluation``, plus bf16 scoring where it is native."""
        return (*self.evaluation, *(("--eval-precision", "bf16") if self.uses_bf16() else ()))

    def uses_bf16(self) -> bool:
        """``bf16`` and this machine (its GPU, else its CPU) runs bfloat16 natively."""
        import torch

        from hanorec.hardware import native_bf16

        return self.bf16 and native_bf16("cuda" if torch.cuda.is_available() else "cpu")


BUDGETS = {
    # 2 CPU cores, smollm2-llava (~135M, 30 layers), sdpa, LoRA dropout off. Measured: an SFT step
    # of 2 examples ~5.8 s in fp32 on an AVX2-only EPYC; ~2.6 s in bf16 on a CPU with avx512_bf16
    # (where bf16 is emulated it is ~150 s, hence `bf16` only where native); 40 users of candidates
    # + hit1 ~55 s (bf16, packed). 13 methods x 3 seeds: ~35 min a seed with bf16 (see
    # results/README.md).
    "cpu": Budget(sft_steps=48, dpo_steps=8, train_examples=128, eval_users=40, sasrec_epochs=40,
                  extra=("--per-device-batch-size", "2", "--gradient-accumulation-steps", "1",
                         "--eval-every", "0",
                         "--eval-examples", "2", "--save-every", "0"), full_users=40, bf16=True,
                  prompt=("--max-length", "512", "--image-budget", "2", "--lora-dropout", "0",
                          "--attn-implementation", "sdpa"),
                  evaluation=("--scoring-mode", "packed")),
    # GPU machines: the recipe's steps (paper scale), every test user.
    "full": Budget(sft_steps=None, dpo_steps=None, train_examples=None, eval_users=None,
                   sasrec_epochs=200),
    # make test: tiny backbone, a couple of steps, a handful of users.
    "smoke": Budget(sft_steps=2, dpo_steps=2, train_examples=8, eval_users=6, sasrec_epochs=2,
                    extra=("--eval-every", "0", "--eval-examples", "2", "--save-every", "0"),
                    full_users=6),
}


# ----------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """One subprocess call; ``done`` exists once it has finished."""

    key: str  # seed0/dpo/train
    cmd: list[str]
    done: Path
    steps_from: Path | None = None  # summary.json holding "steps"
    force: bool = False  # run even though ``done`` exists (a stale output that must be rebuilt)


@dataclass
class Plan:
    """Everything the driver needs to lay out the stages of one grid."""

    config: Path
    run_root: Path
    budget: Budget
    prepared: Path
    python: str = sys.executable

    def module(self, name: str, *args: str) -> list[str]:
        return [self.python, "-m", name, *args]

    def seed_dir(self, seed: int) -> Path:
        return self.run_root / f"seed{seed}"

    def run_dir(self, seed: int, method: str) -> Path:
        return self.seed_dir(seed) / method


def _flag(name: str, value: int | None) -> list[str]:
    return [] if value is None else [name, str(value)]


def sft_stage(plan: Plan, seed: int, method: Method) -> Stage:
    run_dir = plan.run_dir(seed, method.name)
    b = plan.budget
    cmd = plan.module("hanorec.sft", "--config", str(plan.config), "--run-dir", str(run_dir),
                      "--seed", str(seed),
                      *_flag("--max-steps", b.sft_steps),
                      *_flag("--max-train-examples", b.train_examples), *b.training_flags(),
                      *b.prompt,
                      *(["--with-images", "false"] if method.text_only else []))
    return Stage(f"seed{seed}/{method.name}/train", cmd, run_dir / "sft" / "final",
                 run_dir / "sft" / "summary.json")


def sft_checkpoint(plan: Plan, seed: int) -> Path:
    """The SFT checkpoint every preference method of ``seed`` starts from."""
    return plan.run_dir(seed, "sft") / "sft" / "final"


def dpo_stage(plan: Plan, seed: int, method: Method, extra: Sequence[str] = ()) -> Stage:
    run_dir = plan.run_dir(seed, method.name)
    b = plan.budget
    cmd = plan.module("hanorec.dpo", "--config", str(plan.config), "--run-dir", str(run_dir),
                      "--seed", str(seed),
                      "--sft-checkpoint", str(sft_checkpoint(plan, seed)), *method.flags,
                      *_flag("--max-steps", b.dpo_steps),
                      *_flag("--max-train-pairs", b.train_examples), *b.training_flags(), *b.prompt,
                      *extra)
    return Stage(f"seed{seed}/{method.name}/train", cmd, run_dir / "dpo" / "final",
                 run_dir / "dpo" / "summary.json")


def eval_stage(plan: Plan, seed: int, method: Method, checkpoint: Path,
               protocols: Sequence[str]) -> Stage:
    run_dir = plan.run_dir(seed, method.name)
    users = plan.budget.eval_users
    cmd = plan.module("hanorec.evaluate", "--config", str(plan.config), "--run-dir", str(run_dir),
                      "--seed", str(seed),
                      "--checkpoint", str(checkpoint), "--name", EVAL_NAME, "--eval-protocols",
                      ",".join(protocols),
                      *_flag("--eval-max-users", users), *plan.budget.prompt,
                      *plan.budget.evaluation_flags(),
                      *(["--with-images", "false"] if method.text_only else []))
    return Stage(f"seed{seed}/{method.name}/eval", cmd,
                 run_dir / "eval" / EVAL_NAME / "summary.json")


def baseline_stage(plan: Plan, seed: int, models: Sequence[str], protocol: str) -> Stage:
    out = plan.seed_dir(seed) / "baselines" / protocol
    cmd = plan.module("hanorec.baselines", "--prepared-dir", str(plan.prepared), "--protocol",
                      protocol, "--out", str(out),
                      "--models", *models, "--sasrec-seed", str(seed), "--sasrec-epochs",
                      str(plan.budget.sasrec_epochs),
                      "--sasrec-eval-every", "10", "--sasrec-patience", "2", "--seed", str(seed))
    done = out / models[-1] / "summary.json"
    return Stage(f"seed{seed}/baselines-{protocol}/train+eval", cmd, done)


def bpo_stages(plan: Plan, seed: int, method: Method) -> list[Stage]:
    """Blind negatives from the seed's SFT model (images removed), then DPO with them added."""
    run_dir = plan.run_dir(seed, method.name)
    # written next to its final name and renamed: exists = finished
    negatives = run_dir / "bpo" / "blind"
    generate = Stage(f"seed{seed}/{method.name}/generate",
                     plan.module("hanorec.bpo", "generate", "--config", str(plan.config),
                                 "--run-dir", str(run_dir),
                                 "--seed", str(seed), "--checkpoint",
                                 str(sft_checkpoint(plan, seed)),
                                 "--bpo-out", str(negatives),
                                 *_flag("--max-train-pairs", plan.budget.train_examples),
                                 *plan.budget.prompt),
                     negatives)
    return [generate, dpo_stage(plan, seed, method, ("--blind-negatives", str(negatives)))]


def recpo_stages(plan: Plan, seed: int, method: Method) -> list[Stage]:
    """RecPO from the seed's SFT model; the stage itself evaluates on the full catalogue (test
    split).

    Its ``summary.json`` is written after the evaluation, so it marks the whole stage finished.
    """
    run_dir = plan.run_dir(seed, method.name)
    b = plan.budget
    train = Stage(f"seed{seed}/{method.name}/train+eval",
                  plan.module("hanorec.recpo", "--config", str(plan.config), "--run-dir",
                              str(run_dir), "--seed", str(seed),
                              "--recpo-init-checkpoint", str(sft_checkpoint(plan, seed)),
                              *_flag("--max-steps", b.dpo_steps),
                              *_flag("--max-train-examples", b.train_examples),
                              *_flag("--recpo-eval-users", b.full_users),
                              *b.training_flags(), *b.prompt),
                  run_dir / "recpo" / "summary.json", run_dir / "recpo" / "summary.json")
    return [train]


def method_stages(plan: Plan, seed: int, method: Method) -> list[Stage]:
    """The stages of one method and seed (the shared SFT stage is added by :func:`grid`)."""
    run_dir = plan.run_dir(seed, method.name)
    if method.kind == "baseline":
        return []  # one baselines call per protocol serves every baseline model (see grid)
    if method.kind == "sft":
        return [sft_stage(plan, seed, method),
                eval_stage(plan, seed, method, run_dir / "sft" / "final", LLM_PROTOCOLS)]
    if method.kind == "dpo":
        return [dpo_stage(plan, seed, method),
                eval_stage(plan, seed, method, run_dir / "dpo" / "final", LLM_PROTOCOLS)]
    if method.kind == "bpo":
        return [*bpo_stages(plan, seed, method),
                eval_stage(plan, seed, method, run_dir / "dpo" / "final", LLM_PROTOCOLS)]
    if method.kind == "recpo":
        return recpo_stages(plan, seed, method)
    raise ValueError(f"method {method.name}: unknown kind {method.kind!r}")


def data_is_current(config: Path) -> bool:
    """Whether the recipe's prepared folder matches the recipe (same fingerprint), checked in
    process.

    The baselines read the prepared folder directly, so a folder another recipe prepared with other
    settings (say ``max_history``) must be rebuilt before the first stage, not merely exist.
    """
    from hanorec.data.cli_args import parse_data_cli
    from hanorec.data.prepare import is_current

    return is_current(parse_data_cli(["--config", str(config)]))


def grid(plan: Plan, methods: Sequence[Method], seeds: Sequence[int]) -> list[Stage]:
    """All stages in run order: per seed the shared SFT first, then every method's own stages."""
    stages: list[Stage] = []
    # another recipe may have prepared the same folder differently
    if not data_is_current(plan.config):
        stages.append(Stage("prepare",
                            plan.module("hanorec.data", "prepare", "--config", str(plan.config)),
                            plan.prepared / "manifest.json", force=True))
    baselines = [m.name for m in methods if m.kind == "baseline"]
    needs_sft = any(m.kind in ("sft", "dpo", "bpo", "recpo") for m in methods)
    for seed in seeds:
        if baselines:  # the full catalogue only as RecPO's reference
            protocols = (*LLM_PROTOCOLS,
                         "full") if any(m.kind == "recpo" for m in methods) else LLM_PROTOCOLS
            stages += [baseline_stage(plan, seed, baselines, p) for p in protocols]
        if needs_sft:
            stages.append(sft_stage(plan, seed, BY_NAME["sft"]))
        for method in methods:
            stages += [s for s in method_stages(plan, seed, method)
                       if s.key not in {t.key for t in stages}]
    return stages


# ----------------------------------------------------------------------------- running


def run_stage(stage: Stage, log_dir: Path) -> dict[str, Any]:
    """Run one stage as a subprocess; wall time, peak RSS (``os.wait4``) and steps.

    Raises:
        RuntimeError: the subprocess failed (its log file is named).
    """
    log = log_dir / (stage.key.replace("/", "__") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        handle.write("$ " + " ".join(stage.cmd) + "\n")
        handle.flush()
        proc = subprocess.Popen(stage.cmd, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8",
                                     errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"stage {stage.key} failed (exit {proc.returncode}); log {log}:\n{tail}")
    steps = None
    if stage.steps_from is not None and stage.steps_from.is_file():
        steps = json.loads(stage.steps_from.read_text(encoding="utf-8")).get("steps")
    return {"seconds": round(seconds, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "steps": steps,
            "command": " ".join(stage.cmd)}


def execute(stages: Sequence[Stage], run_root: Path, *,
            dry_run: bool = False) -> dict[str, dict[str, Any]]:
    """Run the stages in order, skipping finished ones; records go to ``<run_root>/stages.json``.

    A failed stage is recorded (``"failed"``: the error with the log's tail) and the later stages of
    the same seed and method are left out; the other methods go on (an hours-long grid should not
    stop at one broken method).
    """
    record_path = run_root / "stages.json"
    records = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    failed: set[str] = set()
    for n, stage in enumerate(stages, 1):
        prefix = f"[{n}/{len(stages)}] {stage.key}"
        owner = stage.key.rsplit("/", 1)[0]
        if owner in failed:
            print(f"{prefix}: left out (an earlier stage of {owner} failed)", flush=True)
            continue
        if stage.done.exists() and not stage.force:
            print(f"{prefix}: skip (finished: {stage.done})", flush=True)
            records.setdefault(stage.key, {})["skipped_last_run"] = True
            continue
        if dry_run:
            print(f"{prefix}: " + " ".join(stage.cmd))
            continue
        print(f"{prefix}: running ...", flush=True)
        try:
            record = run_stage(stage, run_root / "logs")
        except RuntimeError as err:
            print(f"{prefix}: FAILED\n{err}", flush=True)
            failed.add(owner)
            records[stage.key] = {"failed": str(err)}
        else:
            records[stage.key] = {**record, "skipped_last_run": False}
            print(f"{prefix}: {record['seconds']:.1f} s (CPU {record['cpu_seconds']:.1f} s), peak "
                  f"{record['peak_rss_mb']:.0f} MB, steps {record['steps']}", flush=True)
        run_root.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return records
