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
LLM_PROTOCOLS = ("candidates", "hit1", "hit3")
# the preference methods: the first negative of each row for pairwise losses, all K for S-DPO
FROZEN = ("--reference", "frozen")
PLAIN = ("--hardness", "none", "--noise", "none")
HANOREC = ("--loss", "sigmoid", "--hardness", "dynamic")

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
    blind_eval: bool = False  # evaluate again without the images (the poster gap)

    def available(self) -> bool:
        """False when the method's module is not (yet) part of the package."""
        return self.module is None or (ROOT / (self.module.replace(".", "/") + ".py")).is_file()


# In run order: when the budget runs out, the later rows are the ones cut (cut methods, never
# users). Continued SFT — the preference stage's rows, steps and adapter with the SFT loss — is
# the control every preference method must beat, so it runs first. The HaNoRec paper's
# comparison (DPO vs dynamic + NoDO) and its reference-free claim come next, then S-DPO, HaRS
# without NoDO and SimPO, then the SFT ablations (posters, collaborative tokens), then the
# variants: static HaRS, NoDO on LoRA, IPO, cDPO, the precomputed reference (the frozen
# reference's numbers in exact arithmetic, at less cost), BPO and RecPO.
METHODS: tuple[Method, ...] = (
    Method("popularity", "Most popular", "baseline"),
    Method("sasrec", "SASRec", "baseline"),
    Method("sft", "SFT only", "sft", blind_eval=True),
    Method("continued-sft", "continued SFT (the control)", "dpo",
           ("--loss", "sft", "--hardness", "none", "--noise", "none", "--reference", "none")),
    Method("dpo", "DPO (sigmoid)", "dpo", ("--loss", "sigmoid", *PLAIN, *FROZEN)),
    Method("hanorec-nodo", "HaNoRec dynamic + NoDO (logits)", "dpo",
           (*HANOREC, "--noise", "logits", *FROZEN), blind_eval=True),
    Method("hanorec-noref", "HaNoRec + NoDO, no reference", "dpo",
           (*HANOREC, "--noise", "logits", "--reference", "none")),
    Method("sdpo", "S-DPO (K = 3)", "dpo", ("--loss", "sdpo", *PLAIN, *FROZEN)),
    Method("hanorec-dynamic", "HaNoRec dynamic (HaRS λ·η)", "dpo",
           (*HANOREC, "--noise", "none", *FROZEN)),
    Method("simpo", "SimPO", "dpo", ("--loss", "simpo", *PLAIN, "--reference", "none")),
    Method("sft-text", "SFT without posters", "sft", text_only=True),
    Method("sft-nocollab", "SFT without collaborative tokens", "sft",
           ("--item-tokens", "false", "--user-token", "false")),
    Method("hanorec-static", "HaNoRec static (HaRS λ)", "dpo",
           ("--loss", "sigmoid", "--hardness", "static", "--noise", "none", *FROZEN)),
    Method("hanorec-lora", "HaNoRec dynamic + NoDO (LoRA)", "dpo",
           (*HANOREC, "--noise", "lora", *FROZEN)),
    Method("ipo", "IPO", "dpo", ("--loss", "ipo", *PLAIN, *FROZEN)),
    Method("cdpo", "cDPO (ε = 0.1)", "dpo",
           ("--loss", "sigmoid", "--label-smoothing", "0.1", *PLAIN, *FROZEN)),
    Method("hanorec-precomputed", "HaNoRec + NoDO, precomputed reference", "dpo",
           (*HANOREC, "--noise", "logits", "--reference", "precomputed")),
    Method("bpo", "HaNoRec + NoDO + BPO blind negatives", "bpo",
           (*HANOREC, "--noise", "logits", *FROZEN), module="hanorec.bpo", blind_eval=True),
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
    sft_extra: tuple[str, ...] = ()  # flags of the SFT stages only
    dpo_extra: tuple[str, ...] = ()  # flags of the preference stages only
    # model and prompt flags of every model stage (training, generation, evaluation)
    prompt: tuple[str, ...] = ()
    evaluation: tuple[str, ...] = ()  # flags of the evaluation stages only
    full_users: int | None = None  # users of the full-catalogue evaluation (RecPO)
    # bf16 autocast in training and scoring, only where bf16 is native (hanorec.hardware)
    bf16: bool = False
    # preference pairs drawn per run (None: train_examples); BPO's blind pass scores these rows
    pairs: int | None = None

    def preference_pairs(self) -> int | None:
        """Pairs a preference run (and BPO's blind pass before it) draws."""
        return self.pairs if self.pairs is not None else self.train_examples

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
    # 2 CPU cores, the learning recipe (configs/ml100k-smollm2.yaml: collaborative item tokens, a
    # user token, the ranking head, pooled posters). Measured side by side on an avx512_bf16 EPYC:
    # an SFT step of 8 examples 1.75 s in bf16, 3.3 s in fp32; a preference step of 8 pairs 2.3 s
    # (frozen reference) or 1.8 s (none) in bf16; the three protocols on all 943 test users share
    # one forward per user (~65 s in bf16). SFT stops at 1,200 examples, where the learning curve
    # (benchmarks/results/learning_curve.md) has passed most-popular by ~0.2 HR@1; the
    # preference stage sees 384 pairs. Where bf16 is emulated (~0.01x fp32) everything runs fp32.
    "cpu": Budget(sft_steps=150, dpo_steps=48, train_examples=None, eval_users=None,
                  sasrec_epochs=200, extra=("--save-every", "0"),
                  sft_extra=("--eval-every", "50", "--eval-examples", "64", "--rank-examples",
                             "200"),
                  dpo_extra=("--eval-every", "16", "--eval-on-start", "true", "--eval-examples",
                             "128"),
                  full_users=200, bf16=True, pairs=384),
    # GPU machines: the recipe's steps (paper scale), every test user.
    "full": Budget(sft_steps=None, dpo_steps=None, train_examples=None, eval_users=None,
                   sasrec_epochs=200),
    # make test: tiny backbone, a couple of steps, a handful of users.
    "smoke": Budget(sft_steps=2, dpo_steps=2, train_examples=8, eval_users=6, sasrec_epochs=2,
                    extra=("--eval-every", "0", "--eval-examples", "2", "--save-every", "0"),
                    dpo_extra=("--eval-on-start", "true"),
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


def prompt_flags(method: Method) -> tuple[str, ...]:
    """The prompt an SFT row trains and is evaluated with (its ablation), as CLI flags."""
    if method.kind != "sft":
        return ()
    return (*method.flags, *(("--with-images", "false") if method.text_only else ()))


def sft_stage(plan: Plan, seed: int, method: Method) -> Stage:
    run_dir = plan.run_dir(seed, method.name)
    b = plan.budget
    cmd = plan.module("hanorec.sft", "--config", str(plan.config), "--run-dir", str(run_dir),
                      "--seed", str(seed),
                      *_flag("--max-steps", b.sft_steps),
                      *_flag("--max-train-examples", b.train_examples), *b.training_flags(),
                      *b.sft_extra, *b.prompt, *prompt_flags(method))
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
                      *_flag("--max-train-pairs", b.preference_pairs()), *b.training_flags(),
                      *b.dpo_extra, *b.prompt, *extra)
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
                      *plan.budget.evaluation_flags(), *prompt_flags(method),
                      *(["--blind", "true"] if method.blind_eval else []))
    return Stage(f"seed{seed}/{method.name}/eval", cmd,
                 run_dir / "eval" / EVAL_NAME / "summary.json")


def baseline_stage(plan: Plan, seed: int, models: Sequence[str],
                   protocols: Sequence[str]) -> Stage:
    """Most-popular and SASRec of one seed: trained once, scored on every protocol."""
    out = plan.seed_dir(seed) / "baselines"
    # one protocol is written to OUT itself, several to OUT/<protocol>: keep the latter layout
    root = out / protocols[0] if len(protocols) == 1 else out
    cmd = plan.module("hanorec.baselines", "--prepared-dir", str(plan.prepared), "--protocol",
                      *protocols, "--out", str(root),
                      "--models", *models, "--sasrec-seed", str(seed), "--sasrec-epochs",
                      str(plan.budget.sasrec_epochs),
                      "--sasrec-eval-every", "10", "--sasrec-patience", "2", "--seed", str(seed))
    done = out / protocols[-1] / models[-1] / "summary.json"
    return Stage(f"seed{seed}/baselines/train+eval", cmd, done)


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
                                 # the blind model's top-scored item: works for every read-out
                                 "--bpo-pick", "score",
                                 *_flag("--max-train-pairs", plan.budget.preference_pairs()),
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
    """All stages in run order, method by method: every seed of a method before the next method.

    The baselines of every seed come first, then each method in the order of ``methods`` (the
    shared SFT of a seed goes in before the first stage that starts from it). So a grid stopped
    early, or cut to a time budget, has whole rows over all seeds and is missing its last
    methods, never users or seeds of the rows it has.
    """
    stages: list[Stage] = []
    # another recipe may have prepared the same folder differently
    if not data_is_current(plan.config):
        stages.append(Stage("prepare",
                            plan.module("hanorec.data", "prepare", "--config", str(plan.config)),
                            plan.prepared / "manifest.json", force=True))
    baselines = [m.name for m in methods if m.kind == "baseline"]
    if baselines:  # the full catalogue only as RecPO's reference
        protocols = (*LLM_PROTOCOLS,
                     "full") if any(m.kind == "recpo" for m in methods) else LLM_PROTOCOLS
        stages += [baseline_stage(plan, seed, baselines, protocols) for seed in seeds]
    for method in methods:
        for seed in seeds:
            if method.kind in ("dpo", "bpo", "recpo") or method.name == "sft":
                stages.append(sft_stage(plan, seed, BY_NAME["sft"]))
            stages += method_stages(plan, seed, method)
    seen: set[str] = set()
    return [s for s in stages if not (s.key in seen or seen.add(s.key))]


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
