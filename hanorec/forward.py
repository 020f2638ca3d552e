"""Shared-prompt forward: encode each prompt (and its images) once, branch to K+1 responses.

Recommendation prompts are long (a history of item images, 64–1,300 tokens each) and the
responses short (an item title). TRL, LLaMA-Factory and S-DPO run the whole prompt once per
response (the *duplicated batch*). Here the prompt runs once per step and the chosen and K
rejected responses branch from it, in one of three ways:

* ``kv`` — the prompt runs with ``use_cache=True``; its KV cache is repeated along the batch
  dimension to B·(K+1) rows (differentiably) and the responses run on top of it, with no
  image input. The logits at each prompt's last token score the first response token.
  ``auto``'s choice in eval mode (scoring many candidates).
* ``packed`` — one sequence per prompt, ``[prompt, resp_0, …, resp_K]``, with a block
  attention mask (each response sees the prompt and, causally, itself) and positions that
  restart after the prompt for every response. ``auto``'s choice in training mode
  (one pass: as few operators as the duplicated batch, so the speed-up holds with several
  threads, see :func:`resolve_mode`) and the only shared path under gradient checkpointing
  (which disables the cache).
* ``duplicate`` — the reference: each prompt and its images repeated K+1 times (how TRL
  concatenates chosen and rejected), one forward. Also the fallback for backbones the
  shared paths do not support.

All three return the same numbers (up to float rounding): a response's log-probability is
``log π(y | x) = Σ_t log π(y_t | x, y_<t)``, the sequence log-likelihood of DPO, computed by
:func:`hanorec.losses.sequence_logps`; NoDO logit noise (HaNoRec arXiv 2511.18740) is added at
response positions by :func:`hanorec.losses.score_noise` first. Prompt batches may be left- or
right-padded; they are moved to left padding internally and positions follow each row's real tokens
(``cumsum(mask) − 1``; for M-RoPE backbones, ``get_rope_index`` of the prompt, with response
tokens continuing one past the prompt's largest position, as ``get_rope_index`` over
prompt+response would give).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hanorec.losses import IGNORE_INDEX, score_noise, score_spread, sequence_logps
from hanorec.models.families import MROPE_FAMILIES, SHARED_FAMILIES, UNSHARED_FAMILIES

Mode = Literal["auto", "kv", "packed", "duplicate"]
MODES: tuple[str, ...] = ("auto", "kv", "packed", "duplicate")

#: Per-token prompt fields (``[B, P]``), reordered with the tokens when re-padding.
PER_TOKEN_KEYS: tuple[str, ...] = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "token_type_ids",
)
#: Prompt fields this module computes itself; passing them is an error.
RESERVED_KEYS: tuple[str, ...] = (
    "labels",
    "position_ids",
    "past_key_values",
    "use_cache",
    "logits_to_keep",
)
_MASK_ATTENTION = frozenset({"eager", "sdpa"})

_PROBED: weakref.WeakKeyDictionary[nn.Module, dict[str, str | None]] = weakref.WeakKeyDictionary()
_WARNED: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class _Prompt:
    """A validated, left-padded prompt batch."""

    inputs: dict[str, Any]  # model inputs; per-token fields left-padded
    mask: Tensor  # [B, P] attention mask (long)

    @property
    def batch(self) -> int:
        return self.mask.shape[0]


@dataclass(frozen=True)
class _Responses:
    """Responses flattened prompt-major: row ``n = b·(K+1) + k``."""

    labels: Tensor  # [N, R], IGNORE_INDEX at padding
    num: int  # K + 1

    @property
    def length(self) -> int:
        return self.labels.shape[1]

    def inputs(self) -> tuple[Tensor, Tensor]:
        """Input ids and mask of tokens ``0 … R−2`` (the last token only gets scored)."""
        labels = self.labels[:, :-1]
        valid = labels != IGNORE_INDEX
        return labels.masked_fill(~valid, 0), valid.long()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def response_logps(
    model: nn.Module,
    prompt_batch: dict[str, Any],
    responses: Tensor,
    *,
    mode: Mode = "auto",
    average: bool = False,
    noise_std: float = 0.0,
    noise_scale: str = "absolute",
    generator: torch.Generator | None = None,
    noise_log: dict[str, Any] | None = None,
) -> Tensor:
    """Log-probability of each of K+1 responses given its prompt, the prompt encoded once.

    ``out[b, k] = Σ_t log π(y_{b,k,t} | x_b, y_{b,k,<t})`` (the policy term of DPO's reward), or the
    mean over the response's tokens with ``average`` (IPO / SimPO). Differentiable: gradients reach
    the model through the prompt pass and the response pass.

    Args:
        model: a causal (vision-)language model from transformers, optionally PEFT-wrapped.
        prompt_batch: model inputs for B prompts: ``input_ids`` ``[B, P]``, ``attention_mask``
            (left or right padding), ``pixel_values`` and the family's extras
            (``image_grid_thw``, ``mm_token_type_ids``, ``pixel_attention_mask``, …).
        responses: ``[B, K+1, R]`` response token ids, chosen at ``k = 0``, right-padded with
            ``-100``.
        mode: ``kv``, ``packed``, ``duplicate`` or ``auto`` (``packed`` in training mode,
            ``kv`` in eval mode; ``duplicate`` with a one-time warning where
            sharing is unsupported; see :func:`resolve_mode`).
        average: length-average instead of sum.
        noise_std: σ of NoDO logit noise at response positions (training policy forward only).
        noise_scale: ``absolute`` (ε ~ N(0, σ²), HaNoRec eq. 9) or ``relative`` (σ times each
            position's spread of logits over the vocabulary), drawn by
            :func:`hanorec.losses.score_noise` on the scored positions.
        generator: ``torch.Generator`` for the noise; draws are in ``(b, k, t)`` order, so
            every mode gives the same noisy result.
        noise_log: When given and noise is drawn, receives ``clean_logps`` (``[B, K+1]``, the
            log-probs without noise, detached) and ``score_spread`` (the mean spread of the
            logits at the scored positions), for logging how visible the noise is.

    Returns:
        ``[B, K+1]`` log-probabilities.

    Raises:
        ValueError: on malformed inputs or an impossible mode.
    """
    prompt = _prepare_prompt(prompt_batch)
    resp = _prepare_responses(responses, prompt.batch)
    chosen = resolve_mode(model, mode, prompt_batch=prompt_batch, responses=responses)
    logits = _LOGITS[chosen](model, prompt, resp)
    if noise_std != 0:  # score_noise rejects a negative or non-finite σ
        clean, logits = logits, _logit_noise(logits, resp.labels, noise_std, noise_scale, generator)
        if noise_log is not None:
            mask = resp.labels != IGNORE_INDEX
            with torch.no_grad():
                noise_log["clean_logps"] = sequence_logps(
                    clean.detach(), resp.labels, average=average
                ).view(prompt.batch, resp.num)
                noise_log["score_spread"] = float(score_spread(clean[mask]).mean())
    logps = sequence_logps(logits, resp.labels, ignore_index=IGNORE_INDEX, average=average)
    return logps.view(prompt.batch, resp.num)


def _logit_noise(
    logits: Tensor, labels: Tensor, std: float, scale: str, generator: torch.Generator | None
) -> Tensor:
    """NoDO logit noise (HaNoRec eq. 9) at the scored positions, a new tensor.

    The scored rows ``logits[labels != IGNORE_INDEX]`` (``[n, V]``, row-major over ``(b, t)``)
    go through :func:`hanorec.losses.score_noise`, so the ``absolute`` draw is exactly
    ``σ·torch.randn((n, V), generator=generator)`` — what ``sequence_logps(noise_std=σ)``
    draws — and ``relative`` scales each row by its spread over the vocabulary. Unscored
    positions keep their logits.
    """
    mask = labels != IGNORE_INDEX
    noisy = score_noise(logits[mask], std, scale=scale, generator=generator)
    return logits.index_put((mask,), noisy)


@torch.no_grad()
def score_candidates(
    model: nn.Module,
    prompt_batch: dict[str, Any],
    candidate_token_ids: Tensor,
    *,
    mode: Mode = "auto",
    average: bool = False,
    candidates_per_pass: int | None = None,
) -> Tensor:
    """Score C candidate answers per prompt (evaluation, e.g. the 20-candidate protocol).

    ``out[b, c] = log π(candidate_c | x_b)`` (summed, or averaged with ``average``); no
    gradient, no noise. One prompt pass scores all C candidates; with ``candidates_per_pass``
    the candidates go in chunks of that size (one prompt pass per chunk), which bounds the
    expanded KV cache at ``B · candidates_per_pass`` rows.

    Args:
        model: the (vision-)language model.
        prompt_batch: as in :func:`response_logps`.
        candidate_token_ids: ``[B, C, R]`` candidate token ids, right-padded with ``-100``.
        mode: as in :func:`response_logps`.
        average: length-average instead of sum.
        candidates_per_pass: chunk size over candidates (None: all at once).

    Returns:
        ``[B, C]`` log-probabilities.
    """
    if candidates_per_pass is not None and candidates_per_pass < 1:
        raise ValueError(f"forward.py: candidates_per_pass must be >= 1, got {candidates_per_pass}")
    if not isinstance(candidate_token_ids, Tensor) or candidate_token_ids.dim() != 3:
        raise ValueError("forward.py: candidate_token_ids must be a [B, C, R] tensor")
    step = candidates_per_pass or max(1, candidate_token_ids.shape[1])
    chunks = candidate_token_ids.split(step, dim=1)
    scores = [
        response_logps(model, prompt_batch, chunk, mode=mode, average=average) for chunk in chunks
    ]
    return torch.cat(scores, dim=1)


def shares_prompt(model: nn.Module) -> bool:
    """Whether ``model``'s family is one whose shared paths are tested equal to the duplicated
    batch (:data:`hanorec.models.families.SHARED_FAMILIES`: LLaVA, Qwen2-VL, Qwen2.5-VL,
    Idefics3, SmolVLM), so that a caller may take them without a capability check."""
    return _family(model) in SHARED_FAMILIES


def resolve_mode(
    model: nn.Module,
    mode: Mode = "auto",
    *,
    prompt_batch: dict[str, Any] | None = None,
    responses: Tensor | None = None,
) -> str:
    """The concrete path (``kv``, ``packed`` or ``duplicate``) ``mode`` runs on for ``model``.

    ``auto`` picks ``packed`` for a model in training mode (the policy forward of a training
    step, and its no-grad reference forward alike, so that equal weights give bit-equal
    log-probs and the first step's rewards are exactly 0) and ``kv`` in eval mode (scoring,
    evaluation: many candidates on one cache). Why: ``kv`` runs the model twice (prompt, then
    the responses on the repeated cache), so a forward + backward issues ~1.7× the operators of
    the duplicated batch (8,860 against 5,261 aten calls on the benchmark's tiny LLaVA, K = 1),
    most of them on the few response tokens; ``packed`` is one pass of ``P + (K+1)(R−1)`` tokens
    with the duplicated batch's operator count. Per-operator costs (dispatch, autograd, the
    thread pool's fork/join) do not shrink with more threads, so ``kv``'s speed-up fell from
    1.8× at one thread to 1.35× at two (``benchmarks/preference_step.py``), while ``packed``
    keeps the token-count speed-up. Under gradient checkpointing ``packed`` is the only shared
    path (it disables the KV cache). When ``packed`` cannot run (an attention kernel without
    arbitrary masks) a training forward takes ``kv``. ``auto`` falls back to ``duplicate`` with
    a one-line warning (once per process and backbone) for backbones whose prompt attention is
    not causal and for unknown backbones whose shared path fails a one-time capability check
    (run on the first prompt of ``prompt_batch`` with ``responses``, no gradient, eval mode,
    compared with ``duplicate``).

    Raises:
        ValueError: for an unknown mode, ``kv`` under gradient checkpointing, or an explicit
            shared mode on a backbone known not to support it.
    """
    if mode not in MODES:
        raise ValueError(f"forward.py: mode must be one of {MODES}, got {mode!r}")
    checkpointing = _checkpointing(model) and model.training
    if mode == "kv" and checkpointing:
        raise ValueError(
            "forward.py: mode='kv' needs the KV cache, which gradient checkpointing disables in "
            "training; use mode='packed' or 'auto'"
        )
    if mode in ("kv", "packed") and (reason := _static_reason(model, mode)) is not None:
        raise ValueError(f"forward.py: {_family(model)} cannot run mode={mode!r}: {reason}")
    if mode != "auto":
        return mode
    wanted = _auto_order(model, checkpointing)
    for candidate in wanted:
        reason = _unsupported_reason(model, candidate, prompt_batch, responses)
        if reason is None:
            return candidate
    wanted = wanted[0]
    family = _family(model)
    if (family, wanted) not in _WARNED:
        _WARNED.add((family, wanted))
        warnings.warn(
            f"hanorec.forward: {family} cannot share the prompt in {wanted} mode ({reason}); "
            "using the duplicated batch (slower, same result)",
            RuntimeWarning,
            stacklevel=3,
        )
    return "duplicate"


def _auto_order(model: nn.Module, checkpointing: bool) -> tuple[str, ...]:
    """The shared paths ``auto`` tries, best first (see :func:`resolve_mode`)."""
    if checkpointing:
        return ("packed",)
    if model.training:
        return ("packed", "kv")
    return ("kv",)


# --------------------------------------------------------------------------------------------
# Input preparation
# --------------------------------------------------------------------------------------------


def _prepare_prompt(batch: dict[str, Any]) -> _Prompt:
    """Validate a prompt batch and move it to left padding (stable: token order kept)."""
    if "input_ids" not in batch:
        raise ValueError("forward.py: prompt_batch needs 'input_ids' [B, P]")
    ids = batch["input_ids"]
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(
            "forward.py: prompt_batch['input_ids'] must be a [B, P] tensor, got "
            f"{getattr(ids, 'shape', ids)}"
        )
    reserved = [key for key in RESERVED_KEYS if key in batch]
    if reserved:
        raise ValueError(
            f"forward.py: prompt_batch must not contain {reserved}; response_logps sets them"
        )
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.long()
    if mask.shape != ids.shape or bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(
            "forward.py: prompt_batch['attention_mask'] must be 0/1 and shaped like input_ids"
        )
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("forward.py: prompt_batch['attention_mask'] has a row with no real token")
    order = torch.argsort(mask, dim=-1, stable=True)  # padding (0) first, tokens in order
    inputs = dict(batch, attention_mask=mask)
    for key in PER_TOKEN_KEYS:
        value = inputs.get(key)
        if isinstance(value, Tensor):
            if value.shape != ids.shape:
                raise ValueError(
                    f"forward.py: prompt_batch[{key!r}] must be shaped like input_ids "
                    f"{tuple(ids.shape)}"
                )
            inputs[key] = value.gather(1, order)
    return _Prompt(inputs=inputs, mask=inputs["attention_mask"])


def _prepare_responses(responses: Tensor, batch: int) -> _Responses:
    """Validate ``[B, K+1, R]`` right-padded responses and flatten them prompt-major."""
    if not isinstance(responses, Tensor) or responses.dim() != 3 or responses.shape[0] != batch:
        raise ValueError(
            f"forward.py: responses must be a [B={batch}, K+1, R] tensor, got "
            f"{getattr(responses, 'shape', responses)}"
        )
    if responses.shape[1] == 0 or responses.shape[2] == 0:
        raise ValueError(
            f"forward.py: responses need K+1 >= 1 and R >= 1, got {tuple(responses.shape)}"
        )
    valid = responses != IGNORE_INDEX
    if bool((valid[..., 1:] & ~valid[..., :-1]).any()):
        raise ValueError(
            "forward.py: responses must be right-padded with -100 (a token follows padding)"
        )
    labels = responses.reshape(-1, responses.shape[2]).long()
    return _Responses(labels=labels, num=responses.shape[1])


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------


def _family(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def _uses_mrope(model: nn.Module) -> bool:
    return _family(model) in MROPE_FAMILIES


def _rope_owner(model: nn.Module) -> nn.Module:
    """The submodule with ``get_rope_index`` (through a PEFT wrapper and the LM head class)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for candidate in (base, getattr(base, "model", None)):
        if candidate is not None and hasattr(candidate, "get_rope_index"):
            return candidate
    raise ValueError(f"forward.py: {_family(model)} uses M-RoPE but exposes no get_rope_index")


def _prompt_positions(model: nn.Module, prompt: _Prompt) -> tuple[Tensor, Tensor]:
    """Prompt position ids (``[B, P]``, or ``[3, B, P]`` for M-RoPE) and each row's next position.

    1-D RoPE: ``pos = cumsum(mask) − 1`` (0 on padding), next = number of real tokens.
    M-RoPE (Qwen2-VL): ``get_rope_index`` of the prompt; text after it continues at
    ``max(pos) + 1`` on all three axes.
    """
    mask = prompt.mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if not _uses_mrope(model):
        return pos, mask.sum(-1)
    inputs = prompt.inputs
    if not _has_visual_grid(inputs):  # text only: M-RoPE reduces to 1-D RoPE on all axes
        return pos.unsqueeze(0).expand(3, -1, -1), mask.sum(-1)
    rope, _ = _rope_owner(model).get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs.get("mm_token_type_ids"),
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=mask,
    )
    return rope, rope.amax(dim=(0, 2)) + 1


def _has_visual_grid(inputs: dict[str, Any]) -> bool:
    return inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None


def _continue_positions(model: nn.Module, start: Tensor, length: int) -> Tensor:
    """Positions ``start[n] + t``, ``t < length``: ``[N, length]`` (M-RoPE: ``[3, N, length]``)."""
    pos = start[:, None] + torch.arange(length, device=start.device)
    return pos.unsqueeze(0).expand(3, -1, -1) if _uses_mrope(model) else pos


# --------------------------------------------------------------------------------------------
# The three paths: each returns logits [N, R, V] with logits[n, t] scoring labels[n, t]
# --------------------------------------------------------------------------------------------


def _kv_logits(model: nn.Module, prompt: _Prompt, resp: _Responses) -> Tensor:
    """Prompt once with a cache, cache repeated K+1 times, responses on top (no images)."""
    pos, start = _prompt_positions(model, prompt)
    out = model(**prompt.inputs, position_ids=pos, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1:].repeat_interleave(resp.num, dim=0)  # scores response token 0
    if resp.length == 1:
        return first
    cache = out.past_key_values
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise RuntimeError(f"forward.py: {_family(model)} returned no expandable KV cache")
    cache.batch_repeat_interleave(resp.num)  # keeps the autograd graph (repeat_interleave)
    ids, valid = resp.inputs()
    mask = torch.cat([prompt.mask.repeat_interleave(resp.num, dim=0), valid], dim=1)
    rpos = _continue_positions(model, start.repeat_interleave(resp.num), ids.shape[1])
    rest = model(
        input_ids=ids, attention_mask=mask, position_ids=rpos, past_key_values=cache, use_cache=True
    )
    return torch.cat([first, rest.logits], dim=1)


def _packed_logits(model: nn.Module, prompt: _Prompt, resp: _Responses) -> Tensor:
    """One sequence per prompt, ``[prompt, resp_0, …, resp_K]``, block attention mask."""
    batch, plen = prompt.mask.shape
    ids, valid = resp.inputs()
    step = ids.shape[1]  # R − 1 input tokens per response
    pos, start = _prompt_positions(model, prompt)
    inputs = _extend_tokens(prompt.inputs, ids.reshape(batch, -1), valid.reshape(batch, -1))
    rpos = _continue_positions(model, start, step)
    rpos = rpos.repeat(*([1] * (rpos.dim() - 1)), resp.num)  # restart after the prompt per response
    inputs["attention_mask"] = _block_mask(
        inputs["attention_mask"], plen, resp.num, step, _dtype(model)
    )
    out = model(
        **inputs, position_ids=torch.cat([pos, rpos], dim=-1), logits_to_keep=1 + resp.num * step
    )
    logits = out.logits
    vocab = logits.shape[-1]
    first = logits[:, :1].unsqueeze(1).expand(-1, resp.num, -1, -1)
    rest = logits[:, 1:].reshape(batch, resp.num, step, vocab)
    return torch.cat([first, rest], dim=2).reshape(batch * resp.num, resp.length, vocab)


def _block_mask(key_valid: Tensor, plen: int, num: int, step: int, dtype: torch.dtype) -> Tensor:
    """Additive ``[B, 1, L, L]`` mask: prompt causal; response j sees the prompt and itself.

    ``allowed[q, k] = valid[k] ∧ k ≤ q ∧ (seg[k] = prompt ∨ seg[k] = seg[q])``, plus the
    diagonal so that padding rows are never fully masked (their outputs are unused).
    """
    length = key_valid.shape[1]
    device = key_valid.device
    seg = torch.cat(
        [
            torch.full((plen,), -1, device=device),
            torch.arange(num, device=device).repeat_interleave(step),
        ]
    )
    idx = torch.arange(length, device=device)
    same = (seg[None, :] == -1) | (seg[None, :] == seg[:, None])
    allowed = same & (idx[None, :] <= idx[:, None])
    allowed = (allowed[None] & key_valid.bool()[:, None, :]) | torch.eye(
        length, dtype=torch.bool, device=device
    )
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return blocked.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _duplicate_logits(model: nn.Module, prompt: _Prompt, resp: _Responses) -> Tensor:
    """Reference: prompts (and images) tiled K+1 times, each followed by one response.

    Row ``k·B + b`` holds prompt ``b`` with response ``k`` (images stay in row order, like TRL's
    concatenated chosen/rejected batch); logits are returned prompt-major.
    """
    batch = prompt.batch
    ids, valid = resp.inputs()
    order = torch.arange(batch * resp.num, device=ids.device).view(batch, resp.num).t().reshape(-1)
    tiled = {key: _tile(value, resp.num) for key, value in prompt.inputs.items()}
    inputs = _extend_tokens(tiled, ids[order], valid[order])
    kwargs: dict[str, Any] = {}
    if not (_uses_mrope(model) and _has_visual_grid(inputs)):  # else: the model's get_rope_index
        pos = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        kwargs["position_ids"] = pos.unsqueeze(0).expand(3, -1, -1) if _uses_mrope(model) else pos
    out = model(**inputs, **kwargs, logits_to_keep=resp.length)
    logits = out.logits.view(resp.num, batch, resp.length, -1).transpose(0, 1)
    return logits.reshape(batch * resp.num, resp.length, -1)


def _tile(value: Any, times: int) -> Any:
    """Repeat a batch field ``times`` times along dim 0 (rows or images, in order)."""
    if isinstance(value, Tensor) and value.dim() > 0:
        return torch.cat([value] * times, dim=0)
    return value


def _extend_tokens(inputs: dict[str, Any], ids: Tensor, valid: Tensor) -> dict[str, Any]:
    """Append response tokens to the per-token fields (text type 0 for the token-type fields)."""
    out = dict(inputs)
    for key in PER_TOKEN_KEYS:
        value = out.get(key)
        if not isinstance(value, Tensor):
            continue
        extra = {"input_ids": ids, "attention_mask": valid}.get(key, torch.zeros_like(ids))
        out[key] = torch.cat([value, extra.to(value.dtype)], dim=1)
    return out


def _dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.get_default_dtype()


_LOGITS = {"kv": _kv_logits, "packed": _packed_logits, "duplicate": _duplicate_logits}


# --------------------------------------------------------------------------------------------
# Capability check (auto mode)
# --------------------------------------------------------------------------------------------


def _attention_kernel(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "_attn_implementation", None) or getattr(
        config, "_attn_implementation", None
    )


def _checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on (transformers 5 name first)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        try:
            return bool(getattr(base, name))
        except AttributeError:
            continue
    return False


def _static_reason(model: nn.Module, mode: str) -> str | None:
    """A reason known without running the model (non-causal prompt, kernel without masks)."""
    if _family(model) in UNSHARED_FAMILIES:
        return "its prompt attention is not causal (prefix-LM)"
    if mode == "packed" and _attention_kernel(model) not in _MASK_ATTENTION:
        return f"attention kernel {_attention_kernel(model)!r} takes no block mask"
    return None


def _unsupported_reason(
    model: nn.Module, mode: str, prompt_batch: dict[str, Any] | None, responses: Tensor | None
) -> str | None:
    """Why ``mode`` cannot run on ``model`` (None when it can); unknown backbones are probed."""
    family = _family(model)
    reason = _static_reason(model, mode)
    if reason is not None or family in SHARED_FAMILIES:
        return reason
    cached = _PROBED.setdefault(model, {})
    if mode not in cached:
        if prompt_batch is None or responses is None:
            return "unknown backbone and no batch to check it on"
        cached[mode] = _probe(model, mode, prompt_batch, responses)
    return cached[mode]


_PROBE_ERRORS = (RuntimeError, ValueError, TypeError, AttributeError, IndexError, KeyError)


def _probe(
    model: nn.Module, mode: str, prompt_batch: dict[str, Any], responses: Tensor
) -> str | None:
    """Run ``mode`` and ``duplicate`` on the first prompt (eval mode, no grad) and compare."""
    row = _first_row(prompt_batch)
    rows = row["input_ids"].shape[0]
    resp = _prepare_responses(responses[:rows, : min(2, responses.shape[1])], rows)
    prompt = _prepare_prompt(row)
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            shared = sequence_logps(_LOGITS[mode](model, prompt, resp), resp.labels)
            reference = sequence_logps(_duplicate_logits(model, prompt, resp), resp.labels)
    except _PROBE_ERRORS as error:
        return f"{type(error).__name__} in the capability check: {str(error).splitlines()[0][:120]}"
    finally:
        for module, flag in flags.items():
            module.training = flag
    tol = 1e-3 if shared.dtype == torch.float32 else 5e-2
    if not torch.allclose(shared.float(), reference.float(), rtol=tol, atol=tol):
        return "its shared log-probs differ from the duplicated batch in the capability check"
    return None


def _first_row(batch: dict[str, Any]) -> dict[str, Any]:
    """The first prompt of a batch, when its image fields can be sliced safely; else the batch."""
    per_row = {
        key: value[:1]
        for key, value in batch.items()
        if key in PER_TOKEN_KEYS and isinstance(value, Tensor)
    }
    if len(per_row) == len([key for key, value in batch.items() if isinstance(value, Tensor)]):
        return dict(batch, **per_row)
    return batch  # images are indexed across rows: check on the whole batch
