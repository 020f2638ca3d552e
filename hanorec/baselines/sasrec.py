"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018), PyTorch.

A compact, faithful re-implementation used as the classic reference on the same splits.

* **Embedding** (paper §III-B): ``E_t = M[s_t]·√d + P[t]`` — item embedding ``M`` (row 0 is
  padding, kept at zero) plus a learned positional embedding ``P`` over a window of ``max_len``
  positions; sequences are left-padded so the most recent item is always at position
  ``max_len − 1``; embedding dropout; padded positions are zeroed.
* **Blocks** (§III-C/D, eq. 2–4): ``L`` blocks of causal self-attention and a point-wise
  two-layer feed-forward net with ReLU, residual connections, layer norm and dropout. We use
  the pre-LN arrangement ``x = x + Drop(Attn(LN(x)))``, ``x = x + Drop(FFN(LN(x)))`` with a
  final LN, which trains stably without warm-up. The attention mask is causal and also hides
  padding keys; every position may attend to itself, so no attention row is empty.
* **Prediction** (§III-E, eq. 5): ``r_{v,t} = F_t · M_v`` (shared item embedding).
* **Loss** (§III-F, eq. 6): at every real position ``t`` of the shifted sequence the target
  is ``s_{t+1}``; binary cross-entropy on the positive and **one sampled negative** per
  position, drawn uniformly from items not in the user's sequence. Adam (β2 = 0.98, as in
  the paper's code).

Public item indices are 0-based (row ``i`` of ``items/``); internally item ``i`` is id
``i + 1`` so that 0 can pad. Training is deterministic for a given ``seed``: initialisation,
shuffling, dropout and negative sampling all draw from seeded generators, inside
:func:`torch.random.fork_rng` so the caller's global RNG state is untouched.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SASRec", "SASRecConfig", "SASRecModel"]


@dataclass
class SASRecConfig:
    """Hyper-parameters of the SASRec baseline (defaults follow Kang & McAuley, 2018, §IV-A)."""

    sasrec_hidden_size: int = field(default=64, metadata={
        "help": "Embedding/hidden size d (paper: 50)."})
    sasrec_num_blocks: int = field(default=2, metadata={
        "help": "Self-attention blocks L (paper: 2)."})
    sasrec_num_heads: int = field(default=1, metadata={"help": "Attention heads (paper: 1)."})
    sasrec_dropout: float = field(default=0.2, metadata={
        "help": "Dropout rate (paper: 0.2 on ML-1M, 0.5 on sparse data)."})
    sasrec_max_len: int = field(default=50, metadata={
        "help": "Maximum sequence length n (paper: 200 on ML-1M, 50 otherwise)."})
    sasrec_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (paper: 0.001)."})
    sasrec_weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay (L2)."})
    sasrec_batch_size: int = field(default=128, metadata={
        "help": "Users per training batch (paper: 128)."})
    sasrec_epochs: int = field(default=200, metadata={
        "help": "Maximum training epochs over all users."})
    sasrec_eval_every: int = field(default=10, metadata={
        "help": "Epochs between validation checks (model selection)."})
    sasrec_patience: int = field(default=5, metadata={
        "help": "Validation checks without improvement before stopping."})
    sasrec_seed: int = field(default=0, metadata={
        "help": "Seed for initialisation, shuffling, dropout and negatives."})
    sasrec_num_threads: int = field(default=2, metadata={
        "help": "torch CPU threads while training/scoring (2 cores here; use 1 when other jobs "
                "share the CPU: oversubscribed threads were 6x slower)."})


class _Block(nn.Module):
    """Pre-LN transformer block: causal self-attention then point-wise feed-forward."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"sasrec_hidden_size {hidden} is not divisible by sasrec_num_heads "
                             f"{heads}")
        self.heads = heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).chunk(3, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        attended = attended.transpose(1, 2).reshape(batch, length, hidden)
        x = x + self.drop(self.out(attended))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class SASRecModel(nn.Module):
    """The SASRec network over padded id sequences ``[B, L]`` (0 = padding)."""

    def __init__(self, num_items: int, config: SASRecConfig) -> None:
        super().__init__()
        hidden = config.sasrec_hidden_size
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(config.sasrec_max_len, hidden)
        self.emb_drop = nn.Dropout(config.sasrec_dropout)
        self.blocks = nn.ModuleList(
            _Block(hidden, config.sasrec_num_heads, config.sasrec_dropout)
            for _ in range(config.sasrec_num_blocks))
        self.final_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.scale = math.sqrt(hidden)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-normal matrices (as the reference code), zero biases, zero padding row."""
        for name, param in self.named_parameters():
            if param.dim() > 1:
                nn.init.xavier_normal_(param)
            elif "norm" not in name:
                nn.init.zeros_(param)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """Hidden states ``F`` ``[B, L, d]`` (eq. 2–4); padded positions are zero."""
        length = seqs.shape[1]
        keep = (seqs != 0).unsqueeze(-1)
        positions = torch.arange(length, device=seqs.device)
        x = self.emb_drop(self.item_emb(seqs) * self.scale + self.pos_emb(positions)) * keep
        causal = torch.ones(length, length, dtype=torch.bool, device=seqs.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=seqs.device)
        attn_mask = ((causal & (seqs != 0)[:, None, :]) | eye)[:, None, :, :]
        for block in self.blocks:
            x = block(x, attn_mask) * keep
        return self.final_norm(x)


def _left_pad(sequences: Sequence[Sequence[int]], length: int, offset: int = 1) -> torch.Tensor:
    """``[N, length]`` int64: the last ``length`` items of each sequence (+offset), left-padded."""
    out = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tail = list(sequence)[-length:]
        if tail:
            out[row, length - len(tail):] = torch.tensor(tail, dtype=torch.long) + offset
    return out


@contextmanager
def _threads(num_threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(num_threads, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sample_negatives(
    positives: torch.Tensor, user_items: torch.Tensor, num_items: int, generator: torch.Generator
) -> torch.Tensor:
    """One negative id per position, uniform over ``1..num_items`` minus the user's items.

    Rejection sampling: draw uniformly, redraw the positions whose id occurs in the user's
    sequence (found by binary search in the sorted ids), until none clashes.

    Args:
        positives: ``[B, L]`` target ids (0 = padding, left 0).
        user_items: ``[B, S]`` ids of every item in each user's sequence, sorted ascending
            per row (0-padded on the left).
        num_items: catalogue size (ids ``1..num_items``).
        generator: the seeded generator.
    """
    negatives = torch.randint(1, num_items + 1, positives.shape, generator=generator)
    last = user_items.shape[1] - 1
    for _ in range(1000):
        found = torch.searchsorted(user_items, negatives).clamp_max(last)
        clash = user_items.gather(1, found) == negatives
        if not clash.any():
            break
        negatives[clash] = torch.randint(1, num_items + 1, (int(clash.sum()),), generator=generator)
    return negatives.masked_fill(positives == 0, 0)


class SASRec:
    """Train and score SASRec on 0-based item index sequences.

    Example::

        model = SASRec(SASRecConfig(sasrec_epochs=50)).fit(train_sequences, num_items)
        scores = model.score(histories, candidate_ids)   # [U, C] numpy float64
    """

    def __init__(self, config: SASRecConfig | None = None) -> None:
        self.config = config or SASRecConfig()
        self.model: SASRecModel | None = None
        self.num_items = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ training
    def _batches(
        self, sequences: list[list[int]], generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(inputs, positives, user_items)`` for shuffled batches of users."""
        length = self.config.sasrec_max_len
        order = torch.randperm(len(sequences), generator=generator).tolist()
        size = self.config.sasrec_batch_size
        for start in range(0, len(order), size):
            chunk = [sequences[i] for i in order[start:start + size]]
            inputs = _left_pad([s[:-1] for s in chunk], length)
            positives = _left_pad([s[1:] for s in chunk], length)
            longest = max(len(s) for s in chunk)
            user_items = _left_pad(chunk, longest).sort(dim=1).values
            yield inputs, positives, user_items

    def _epoch(self, sequences: list[list[int]], optimizer: torch.optim.Optimizer,
               generator: torch.Generator) -> float:
        assert self.model is not None
        self.model.train()
        total, count = 0.0, 0
        for inputs, positives, user_items in self._batches(sequences, generator):
            negatives = _sample_negatives(positives, user_items, self.num_items, generator)
            hidden = self.model(inputs)
            pos_logits = (hidden * self.model.item_emb(positives)).sum(-1)
            neg_logits = (hidden * self.model.item_emb(negatives)).sum(-1)
            real = positives != 0
            loss = (F.binary_cross_entropy_with_logits(pos_logits[real],
                                                       torch.ones_like(pos_logits[real]))
                    + F.binary_cross_entropy_with_logits(neg_logits[real],
                                                         torch.zeros_like(neg_logits[real])))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * int(real.sum())
            count += int(real.sum())
        return total / max(count, 1)

    def fit(
        self,
        train_sequences: Sequence[Sequence[int]],
        num_items: int,
        *,
        validate: Callable[[SASRec], float] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> SASRec:
        """Train on every prefix position of every training sequence (BCE, eq. 6).

        Args:
            train_sequences: per-user 0-based item indices, oldest first; sequences shorter
                than 2 items are skipped (nothing to predict).
            num_items: catalogue size.
            validate: optional callback returning a validation score (higher is better),
                called every ``sasrec_eval_every`` epochs; the best weights are kept and
                training stops after ``sasrec_patience`` checks without improvement.
            log: optional line logger.

        Returns:
            ``self`` with the selected weights loaded.
        """
        cfg = self.config
        sequences = [[int(i) for i in s] for s in train_sequences if len(s) >= 2]
        if not sequences:
            raise ValueError("train_sequences: no sequence with at least 2 items")
        flat = [i for s in sequences for i in s]
        if min(flat) < 0 or max(flat) >= num_items:
            raise ValueError(f"train_sequences: item index out of range [0, {num_items})")
        self.num_items = num_items
        self.history = []
        with torch.random.fork_rng(devices=[]), _threads(cfg.sasrec_num_threads):
            torch.manual_seed(cfg.sasrec_seed)
            generator = torch.Generator().manual_seed(cfg.sasrec_seed)
            self.model = SASRecModel(num_items, cfg)
            optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.sasrec_lr,
                                         betas=(0.9, 0.98), weight_decay=cfg.sasrec_weight_decay)
            self._train_loop(sequences, optimizer, generator, validate, log)
        return self

    def _train_loop(
        self,
        sequences: list[list[int]],
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        validate: Callable[[SASRec], float] | None,
        log: Callable[[str], None] | None,
    ) -> None:
        """Epoch loop with periodic validation, best-checkpoint keeping and early stopping."""
        cfg = self.config
        best_score, best_state, stale = -math.inf, None, 0
        start = time.perf_counter()
        for epoch in range(1, cfg.sasrec_epochs + 1):
            loss = self._epoch(sequences, optimizer, generator)
            record = {"epoch": epoch, "train/loss": loss, "seconds": time.perf_counter() - start}
            if validate is not None and (epoch % cfg.sasrec_eval_every == 0
                                         or epoch == cfg.sasrec_epochs):
                score = float(validate(self))
                record["eval/score"] = score
                if score > best_score:
                    best_score, stale = score, 0
                    best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                else:
                    stale += 1
            self.history.append(record)
            if log is not None and "eval/score" in record:
                log(f"epoch {epoch}: loss {loss:.4f} validation {record['eval/score']:.4f}")
            if stale >= cfg.sasrec_patience:
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(
        self,
        histories: Sequence[Sequence[int]],
        candidate_ids: object | None = None,
        *,
        batch_size: int = 256,
    ) -> np.ndarray:
        """Scores ``F_last · M_v`` (eq. 5) for candidate lists or the full catalogue.

        Args:
            histories: per-user 0-based item indices, oldest first (the last ``max_len`` are
                used). An empty history gives the model's position-only representation.
            candidate_ids: ``[U, C]`` 0-based item indices, or ``None`` for all items.
            batch_size: users per forward pass.

        Returns:
            float64 ``[U, C]`` or ``[U, num_items]`` (column ``j`` is item ``j``); history
            items are not masked here (pass a mask to :func:`hanorec.metrics.target_ranks`).
        """
        if self.model is None:
            raise ValueError("SASRec.score: call fit() first")
        candidates = None
        if candidate_ids is not None:
            candidates = torch.as_tensor(np.asarray(candidate_ids, dtype=np.int64))
            if candidates.ndim != 2 or candidates.shape[0] != len(histories):
                raise ValueError(f"candidate_ids: expected shape [{len(histories)}, C], "
                                 f"got {tuple(candidates.shape)}")
        self.model.eval()
        outputs = []
        with _threads(self.config.sasrec_num_threads):
            for start in range(0, len(histories), batch_size):
                seqs = _left_pad(histories[start:start + batch_size], self.config.sasrec_max_len)
                last = self.model(seqs)[:, -1, :]
                if candidates is None:
                    outputs.append(last @ self.model.item_emb.weight[1:].T)
                else:
                    emb = self.model.item_emb(candidates[start:start + batch_size] + 1)
                    outputs.append(torch.einsum("ud,ucd->uc", last, emb))
        if not outputs:
            width = self.num_items if candidates is None else candidates.shape[1]
            return np.zeros((0, width))
        return torch.cat(outputs).double().numpy()

    def config_dict(self) -> dict[str, object]:
        """The hyper-parameters as a plain dict (for summaries)."""
        return asdict(self.config)
