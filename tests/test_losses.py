"""Tests for ``hanorec.losses``: hand-worked values, plain reference implementations, gradcheck."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hanorec import losses as L

DT = torch.float64


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=DT)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ------------------------------------------------------------------------- sequence_logps


def _dense_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Reference: dense log_softmax, then a Python loop over the scored positions."""
    logp = torch.log_softmax(logits.to(DT), dim=-1)
    out = []
    for b in range(labels.shape[0]):
        terms = [logp[b, t, labels[b, t]] for t in range(labels.shape[1]) if labels[b, t] != -100]
        total = sum(terms, torch.zeros((), dtype=DT))
        out.append(total / len(terms) if average and terms else total)
    return torch.stack(out)


@pytest.fixture
def lm_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=gen, dtype=DT) * 3
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    labels[0, :2] = -100  # a prompt
    labels[2, :] = -100  # nothing scored
    return logits, labels


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_dense_reference(lm_batch, average) -> None:
    """Sum / mean over scored tokens equals the dense log_softmax loop; empty row gives 0."""
    logits, labels = lm_batch
    got = L.sequence_logps(logits, labels, average=average)
    torch.testing.assert_close(got, _dense_logps(logits, labels, average))
    assert got[2].item() == 0.0


def test_sequence_logps_caller_aligned_slice_and_small_chunks(lm_batch, monkeypatch) -> None:
    """No internal shift: logits[:, :-1] scores labels[:, 1:]; tiny chunks change nothing."""
    logits, labels = lm_batch
    expected = _dense_logps(logits[:, :-1], labels[:, 1:])
    noisy = L.sequence_logps(
        logits, labels, noise_std=0.3, generator=torch.Generator().manual_seed(2)
    )
    # 2 positions per chunk
    monkeypatch.setattr("hanorec.losses.logps._CHUNK_ELEMENTS", 2 * logits.shape[-1])
    torch.testing.assert_close(L.sequence_logps(logits[:, :-1], labels[:, 1:]), expected)
    again = L.sequence_logps(
        logits, labels, noise_std=0.3, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(again, noisy)


def test_sequence_logps_hand_value() -> None:
    """Uniform logits over V=4: each scored token has log(1/4); two tokens -> 2·log(1/4), mean
    log(1/4)."""
    logits = torch.zeros(1, 3, 4, dtype=DT)
    labels = torch.tensor([[-100, 1, 3]])
    assert L.sequence_logps(logits, labels).item() == pytest.approx(2 * math.log(0.25))
    assert L.sequence_logps(logits, labels, average=True).item() == pytest.approx(math.log(0.25))


def test_sequence_logps_noise_reproduced_by_hand(lm_batch) -> None:
    """Noise = σ·randn((n scored, V)) from the generator, added at scored positions (row-major)."""
    logits, labels = lm_batch
    sigma = 0.7
    got = L.sequence_logps(
        logits, labels, noise_std=sigma, generator=torch.Generator().manual_seed(5)
    )
    mask = labels != -100
    eps = torch.randn(
        (int(mask.sum()), logits.shape[-1]), generator=torch.Generator().manual_seed(5), dtype=DT
    )
    noisy = logits.clone()
    noisy[mask] += sigma * eps
    torch.testing.assert_close(got, _dense_logps(noisy, labels))
    assert not torch.allclose(got[:2], _dense_logps(logits, labels)[:2])


def test_sequence_logps_gradcheck(lm_batch) -> None:
    """Custom chunked backward agrees with finite differences (clean, averaged and noisy)."""
    logits, labels = lm_batch
    x = logits[:, :, :5].clone().requires_grad_()
    lab = labels.clamp(max=4).masked_fill(labels == -100, -100)
    assert torch.autograd.gradcheck(lambda z: L.sequence_logps(z, lab), (x,))
    assert torch.autograd.gradcheck(
        lambda z: L.sequence_logps(z[:, 1:], lab[:, :-1], average=True), (x,)
    )

    def noisy(z: torch.Tensor) -> torch.Tensor:
        return L.sequence_logps(z, lab, noise_std=0.5, generator=torch.Generator().manual_seed(1))

    assert torch.autograd.gradcheck(noisy, (x,))


def test_sequence_logps_bfloat16_reduced_in_float32(lm_batch) -> None:
    """bf16 logits give float32 log-probs equal to the float32 computation on the same values."""
    logits, labels = lm_batch
    low = logits.to(torch.bfloat16)
    got = L.sequence_logps(low, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, L.sequence_logps(low.float(), labels))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"logits": torch.zeros(2, 3)}, "logits"),
        ({"labels": torch.zeros(2, 4, dtype=torch.long)}, "labels"),
        ({"labels": torch.full((2, 3), 5)}, "labels"),
        ({"noise_std": -0.1}, "noise_std"),
    ],
)
def test_sequence_logps_errors(kwargs, field) -> None:
    """Bad shape, out-of-vocabulary label, negative noise: ValueError naming the argument."""
    args = {"logits": torch.zeros(2, 3, 5), "labels": torch.zeros(2, 3, dtype=torch.long)} | kwargs
    with pytest.raises(ValueError, match=field):
        L.sequence_logps(args.pop("logits"), args.pop("labels"), **args)


# ------------------------------------------------------------------------- preference_loss


def _reference_losses(c, r, rc, rr, beta, kind, eps=0.0, gamma=0.0):
    """Plain per-sample loop with math: the formulas of the DPO-family papers."""
    out = []
    for i in range(len(c)):
        b = beta[i] if isinstance(beta, (list, tuple)) else beta
        rw = c[i] - (rc[i] if rc is not None else 0.0)
        rl = [r[i][k] - (rr[i][k] if rr is not None else 0.0) for k in range(len(r[i]))]
        h = rw - rl[0]
        if kind == "sigmoid":
            out.append(-(1 - eps) * _logsig(b * h) - eps * _logsig(-b * h))
        elif kind == "ipo":
            out.append((h - 1 / (2 * b)) ** 2)
        elif kind == "hinge":
            out.append(max(0.0, 1 - b * h))
        elif kind == "simpo":
            out.append(-_logsig(b * h - gamma))
        elif kind == "sft":
            out.append(-c[i])
        else:
            out.append(-_logsig(-math.log(sum(math.exp(b * (x - rw)) for x in rl))))
    return out


def _random_logps(batch: int, k: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(*shape, generator=gen, dtype=DT) * 2
        for shape in [(batch,), (batch, k), (batch,), (batch, k)]
    ]


@pytest.mark.parametrize("kind", L.LOSS_TYPES)
def test_preference_loss_matches_reference_loop(kind) -> None:
    """Each loss type equals the per-sample math loop (with references unless reference-free)."""
    k = 3 if kind == "sdpo" else 1
    c, r, rc, rr = _random_logps(5, k, seed=1)
    refs = (None, None) if L.LOSSES[kind].reference_free else (rc, rr)
    out = L.preference_loss(
        c, r, *refs, beta=0.7, loss_type=kind, simpo_gamma=0.3 if kind == "simpo" else 0.0
    )
    expected = _reference_losses(
        c.tolist(),
        r.tolist(),
        *(x.tolist() if x is not None else None for x in refs),
        0.7,
        kind,
        gamma=0.3 if kind == "simpo" else 0.0,
    )
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=DT))
    assert out.loss.item() == pytest.approx(sum(expected) / 5)


def test_preference_loss_hand_values() -> None:
    """Worked by hand (β=1 unless stated, no references):

    * sigmoid, chosen 0, rejected log 0.5: h = log 2, loss = −log σ(log 2) = −log(2/3) = log 1.5.
    * cDPO ε=0.2, same h: 0.8·log 1.5 − 0.2·log σ(−log 2) = 0.8·log 1.5 + 0.2·log 3.
    * ipo, β=0.5, h=3: (3 − 1/(2·0.5))² = 4.   * hinge, h=0.5: relu(1 − 0.5) = 0.5.
    * simpo, avg_w=−1, avg_l=−2, β=2, γ=1: −log σ(2·1 − 1) = log(1 + e^{−1}).
    * sdpo, r_w=0, r_k = log ½ twice: −log σ(−log(½ + ½)) = −log σ(0) = log 2.
    * sft, log π(y_w) = log ¼, any rejected: −log ¼ = log 4.
    """
    half = math.log(0.5)
    assert L.preference_loss(_vec(0.0), _vec(half), beta=1.0).loss.item() == pytest.approx(
        math.log(1.5)
    )
    cdpo = L.preference_loss(_vec(0.0), _vec(half), beta=1.0, label_smoothing=0.2).loss.item()
    assert cdpo == pytest.approx(0.8 * math.log(1.5) + 0.2 * math.log(3))
    assert L.preference_loss(
        _vec(1.0), _vec(-2.0), beta=0.5, loss_type="ipo"
    ).loss.item() == pytest.approx(4.0)
    assert L.preference_loss(
        _vec(0.5), _vec(0.0), beta=1.0, loss_type="hinge"
    ).loss.item() == pytest.approx(0.5)
    simpo = L.preference_loss(
        _vec(-1.0), _vec(-2.0), beta=2.0, loss_type="simpo", simpo_gamma=1.0
    ).loss.item()
    assert simpo == pytest.approx(math.log(1 + math.exp(-1)))
    sdpo = L.preference_loss(
        _vec(0.0), torch.tensor([[half, half]], dtype=DT), beta=1.0, loss_type="sdpo"
    )
    assert sdpo.loss.item() == pytest.approx(math.log(2))
    sft = L.preference_loss(_vec(math.log(0.25)), _vec(3.0), beta=0.1, loss_type="sft")
    assert sft.loss.item() == pytest.approx(math.log(4))


def test_rewards_margins_accuracies_by_hand() -> None:
    """β=2, chosen r = [1, 0], rejected r = [[0, 2], [−1, −3]] (policy − reference):

    chosen rewards [2, 0]; rejected rewards [[0, 4], [−2, −6]]; margins [2 − 2, 0 − (−4)] = [0, 4];
    accuracies: row 0 loses to the reward 4 -> 0, row 1 beats both -> 1. Rewards carry no grad.
    """
    c = torch.tensor([1.5, 0.5], dtype=DT, requires_grad=True)
    rc = torch.tensor([0.5, 0.5], dtype=DT)
    r = torch.tensor([[0.0, 2.0], [-1.0, -3.0]], dtype=DT)
    out = L.preference_loss(c, r, rc, torch.zeros(2, 2, dtype=DT), beta=2.0, loss_type="sdpo")
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([2.0, 0.0], dtype=DT))
    torch.testing.assert_close(
        out.rejected_rewards, torch.tensor([[0.0, 4.0], [-2.0, -6.0]], dtype=DT)
    )
    torch.testing.assert_close(out.margins, torch.tensor([0.0, 4.0], dtype=DT))
    torch.testing.assert_close(out.accuracies, torch.tensor([0.0, 1.0], dtype=DT))
    assert not out.chosen_rewards.requires_grad and out.loss.requires_grad


@pytest.mark.parametrize("kind", L.LOSS_TYPES)
def test_preference_loss_gradcheck(kind) -> None:
    """float64 gradcheck w.r.t. every log-prob input, for each loss type."""
    k = 2 if kind == "sdpo" else 1
    c, r, rc, rr = (x.requires_grad_() for x in _random_logps(4, k, seed=2))
    if kind == "hinge":  # keep away from the kink at βh = 1
        assert bool(((0.7 * ((c - rc) - (r - rr)[:, 0]) - 1).abs() > 1e-3).all())
    refs = () if L.LOSSES[kind].reference_free else (rc, rr)
    gamma = 0.2 if kind == "simpo" else 0.0

    def fn(*logps: torch.Tensor) -> torch.Tensor:
        return L.preference_loss(*logps, beta=0.7, loss_type=kind, simpo_gamma=gamma).losses

    assert torch.autograd.gradcheck(fn, (c, r, *refs))


def test_sdpo_with_one_negative_equals_dpo() -> None:
    """S-DPO at K=1 (given as [B] or [B, 1]) equals DPO's sigmoid loss, values and gradients."""
    c, r, rc, rr = _random_logps(6, 1, seed=3)
    c.requires_grad_()
    dpo = L.preference_loss(c, r[:, 0], rc, rr[:, 0], beta=0.3)
    (g_dpo,) = torch.autograd.grad(dpo.loss, c)
    for rej, ref in ((r, rr), (r[:, 0], rr[:, 0])):
        sdpo = L.preference_loss(c, rej, rc, ref, beta=0.3, loss_type="sdpo")
        torch.testing.assert_close(sdpo.losses, dpo.losses)
        torch.testing.assert_close(torch.autograd.grad(sdpo.loss, c)[0], g_dpo)


@pytest.mark.parametrize("kind", L.LOSS_TYPES)
def test_per_sample_beta_equals_loop_of_scalar_beta(kind) -> None:
    """β as a [B] tensor gives, row by row, the loss computed with that row's scalar β."""
    k = 2 if kind == "sdpo" else 1
    c, r, rc, rr = _random_logps(4, k, seed=4)
    refs = (None, None) if L.LOSSES[kind].reference_free else (rc, rr)
    betas = torch.tensor([0.05, 0.1, 0.5, 2.0], dtype=DT)
    got = L.preference_loss(c, r, *refs, beta=betas, loss_type=kind)
    for i in range(4):
        one = L.preference_loss(
            c[i : i + 1],
            r[i : i + 1],
            *(x[i : i + 1] if x is not None else None for x in refs),
            beta=float(betas[i]),
            loss_type=kind,
        )
        torch.testing.assert_close(got.losses[i : i + 1], one.losses)
        torch.testing.assert_close(got.chosen_rewards[i : i + 1], one.chosen_rewards)


def test_beta_tensor_is_a_constant() -> None:
    """A β tensor that requires grad receives none (HaRS betas are weights, not parameters)."""
    c, r, rc, rr = _random_logps(3, 1, seed=5)
    beta = torch.tensor([0.1, 0.2, 0.3], dtype=DT, requires_grad=True)
    out = L.preference_loss(c.requires_grad_(), r[:, 0], rc, rr[:, 0], beta=beta)
    out.loss.backward()
    assert beta.grad is None and c.grad is not None


@pytest.mark.parametrize("kind", L.LOSS_TYPES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_logps_stay_finite(kind, sign) -> None:
    """Log-probs of ±1e4 give finite losses and finite gradients (log σ and logsumexp are
    stable). Continued SFT ignores the rejected log-probs, so they get no gradient at all."""
    k = 2 if kind == "sdpo" else 1
    c = torch.full((2,), sign * 1e4, requires_grad=True)
    r = torch.full((2, k), -sign * 1e4, requires_grad=True)
    out = L.preference_loss(c, r if kind == "sdpo" else r[:, 0], beta=1.0, loss_type=kind)
    out.loss.backward()
    assert (
        torch.isfinite(out.losses).all()
        and torch.isfinite(c.grad).all()
        and (r.grad is None if kind == "sft" else torch.isfinite(r.grad).all())
    )


def _bad_call(**overrides):
    args = {"chosen_logps": torch.zeros(2), "rejected_logps": torch.zeros(2)} | overrides
    return L.preference_loss(args.pop("chosen_logps"), args.pop("rejected_logps"), **args)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"rejected_logps": torch.zeros(3)}, "rejected_logps"),
        ({"chosen_logps": torch.zeros(2, 1)}, "chosen_logps"),
        ({"ref_chosen_logps": torch.zeros(2)}, "ref_chosen_logps and ref_rejected_logps"),
        (
            {"ref_chosen_logps": torch.zeros(2), "ref_rejected_logps": torch.zeros(3)},
            "ref_rejected_logps",
        ),
        ({"rejected_logps": torch.zeros(2, 3)}, "K=3"),
        ({"rejected_logps": torch.zeros(2, 3), "loss_type": "ipo"}, "loss_type='ipo'"),
        ({"rejected_logps": torch.zeros(2, 3), "loss_type": "hinge"}, "loss_type='hinge'"),
        ({"rejected_logps": torch.zeros(2, 3), "loss_type": "simpo"}, "loss_type='simpo'"),
        ({"beta": -0.1}, "beta"),
        ({"beta": 0.0}, "beta"),
        ({"beta": torch.tensor([0.1, -0.1])}, "beta"),
        ({"beta": torch.tensor([0.1, 0.1, 0.1])}, "beta"),
        ({"loss_type": "kto"}, "loss_type"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"label_smoothing": 0.1, "loss_type": "ipo"}, "label_smoothing"),
        ({"chosen_logps": torch.tensor([0.0, math.nan])}, "chosen_logps contains NaN"),
        ({"rejected_logps": torch.tensor([math.nan, 0.0])}, "rejected_logps contains NaN"),
        (
            {
                "ref_chosen_logps": torch.tensor([math.nan, 0.0]),
                "ref_rejected_logps": torch.zeros(2),
            },
            "ref_chosen_logps",
        ),
        (
            {
                "ref_chosen_logps": torch.zeros(2),
                "ref_rejected_logps": torch.tensor([0.0, math.nan]),
            },
            "ref_rejected_logps",
        ),
        (
            {
                "loss_type": "simpo",
                "ref_chosen_logps": torch.zeros(2),
                "ref_rejected_logps": torch.zeros(2),
            },
            "reference-free",
        ),
    ],
)
def test_preference_loss_errors(overrides, field) -> None:
    """Every invalid argument raises a ValueError whose message names it."""
    with pytest.raises(ValueError, match=field):
        _bad_call(**overrides)


# ------------------------------------------------------------------------- HaRS


def test_fuse_item_embeddings_by_hand() -> None:
    """text (2, 0), image (0, 5): normalize((1, 0) + (0, 1)) = (1, 1)/√2; masked row -> (1, 0)."""
    text = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=DT)
    image = torch.tensor([[0.0, 5.0], [0.0, 5.0]], dtype=DT)
    r = 1 / math.sqrt(2)
    fused = L.fuse_item_embeddings(text, image, torch.tensor([True, False]))
    torch.testing.assert_close(fused, torch.tensor([[r, r], [1.0, 0.0]], dtype=DT))
    torch.testing.assert_close(
        L.fuse_item_embeddings(text), torch.tensor([[1.0, 0.0]] * 2, dtype=DT)
    )
    with pytest.raises(ValueError, match="image must have shape"):
        L.fuse_item_embeddings(text, image[:1])


def _brute_profiles(emb: np.ndarray, k: int) -> np.ndarray:
    """Dense N×N cosine matrix, diagonal removed, top-K per row sorted descending."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return -np.sort(-sims, axis=1)[:, :k]


def _brute_deltas(emb: np.ndarray, pos: np.ndarray, neg: np.ndarray, k: int) -> np.ndarray:
    prof = _brute_profiles(emb, k)
    soft = np.exp(prof) / np.exp(prof).sum(1, keepdims=True)
    neg = neg.reshape(len(pos), -1)
    out = [np.mean([np.linalg.norm(soft[p] - soft[n]) for n in row]) for p, row in zip(pos, neg)]
    return np.array(out)


@pytest.fixture
def catalogue() -> torch.Tensor:
    return torch.randn(37, 8, generator=torch.Generator().manual_seed(7), dtype=DT)


@pytest.mark.parametrize("chunk_size", [5, 4096])
def test_neighbour_profiles_match_brute_force(catalogue, chunk_size) -> None:
    """Chunked running top-K equals the dense N×N computation (itself excluded, sorted)."""
    items = torch.tensor([0, 36, 5, 5, 17])
    got = L.neighbour_profiles(catalogue, items, top_k=4, chunk_size=chunk_size)
    np.testing.assert_allclose(
        got.numpy(), _brute_profiles(catalogue.numpy(), 4)[items.numpy()], atol=1e-12
    )


def test_neighbour_profiles_duplicate_item_counts_once() -> None:
    """Items 0 and 1 are identical: 0's nearest other item is 1 with similarity 1 (itself
    excluded)."""
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=DT)
    got = L.neighbour_profiles(emb, torch.tensor([0, 2]), top_k=2, chunk_size=1)
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=DT))


@pytest.mark.parametrize("neg_shape", [(6,), (6, 3)])
def test_pair_deltas_match_brute_force(catalogue, neg_shape) -> None:
    """Δ (eq. 5) vs dense reference, [B] and [B, K] negatives, chunk_size < N gives the same."""
    gen = torch.Generator().manual_seed(8)
    pos = torch.randint(0, 37, (6,), generator=gen)
    neg = torch.randint(0, 37, neg_shape, generator=gen)
    expected = _brute_deltas(catalogue.numpy(), pos.numpy(), neg.numpy(), 5)
    big = L.pair_deltas(catalogue, pos, neg, top_k=5)
    small = L.pair_deltas(catalogue, pos, neg, top_k=5, chunk_size=4)
    np.testing.assert_allclose(big.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(small.numpy(), expected, atol=1e-12)
    assert L.pair_deltas(catalogue, pos, pos, top_k=5).abs().max().item() == 0.0


def test_hars_guards(catalogue) -> None:
    """top_k must be < N; indices must be in range."""
    with pytest.raises(ValueError, match="top_k"):
        L.pair_deltas(catalogue, torch.tensor([0]), torch.tensor([1]), top_k=37)
    with pytest.raises(ValueError, match="negatives"):
        L.pair_deltas(catalogue, torch.tensor([0]), torch.tensor([37]))
    with pytest.raises(ValueError, match="negatives"):
        L.pair_deltas(catalogue, torch.tensor([0, 1]), torch.tensor([2]))


def test_hardness_lambdas_by_hand() -> None:
    """Δ = [0, 2]: mean 1, λ = [σ(0)/σ(1), σ(2)/σ(1)] (eq. 6)."""
    got = L.hardness_lambdas(torch.tensor([0.0, 2.0], dtype=DT))
    torch.testing.assert_close(got, torch.tensor([_sig(0) / _sig(1), _sig(2) / _sig(1)], dtype=DT))


def test_responsiveness_worked_examples() -> None:
    """Eq. 8 by hand.

    * h = [1, 2, 3, 10], β0 = 0.5: g = [.5, 1, 1.5, 5], mean 2, ĝ = [.25, .5, .75, 2.5] (mean 1);
      trimmed [.5, .75], mean .625: η = σ(.625)/σ(1).
    * h = [−3, 1, 2], β0 = 1: mean g = 0 -> divide by mean|g| = 2: ĝ = [−1.5, .5, 1] (mean 0);
      trimmed [.5]: η = σ(.5)/σ(0) = 2σ(.5).
    * h = 0: ĝ = 0/1e-8 = 0, η = 1.   * B = 2, h = [1, 3]: nothing trimmed, η = σ(1)/σ(1) = 1.
    """
    h = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=DT, requires_grad=True)
    eta = L.responsiveness(h, 0.5)
    assert eta.item() == pytest.approx(_sig(0.625) / _sig(1.0)) and not eta.requires_grad
    assert L.responsiveness(torch.tensor([-3.0, 1.0, 2.0], dtype=DT), 1.0).item() == pytest.approx(
        2 * _sig(0.5)
    )
    assert L.responsiveness(torch.zeros(5, dtype=DT), 0.1).item() == pytest.approx(1.0)
    assert L.responsiveness(torch.tensor([1.0, 3.0], dtype=DT), 0.1).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="beta0"):
        L.responsiveness(h, 0.0)


def test_hanorec_betas_floor() -> None:
    """β = max(1e-6, 0.1·2·λ): λ = [1, 1e-9] -> [0.2, 1e-6] (eq. 11)."""
    got = L.hanorec_betas(torch.tensor([1.0, 1e-9], dtype=DT), torch.tensor(2.0, dtype=DT), 0.1)
    torch.testing.assert_close(got, torch.tensor([0.2, 1e-6], dtype=DT))


def _reference_deltas(emb: np.ndarray, pos: np.ndarray, neg: np.ndarray, k: int,
                      tau: float) -> np.ndarray:
    """Eq. 5 with a temperature, written independently: a double loop over items in float64,
    the top-K by Python sorting, a numerically plain softmax of s/τ."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def profile(v: int) -> np.ndarray:
        sims = sorted((float(unit[v] @ unit[u]) for u in range(len(unit)) if u != v),
                      reverse=True)[:k]
        scaled = np.array(sims) / tau
        weights = np.exp(scaled - scaled.max())
        return weights / weights.sum()

    neg = neg.reshape(len(pos), -1)
    return np.array([np.mean([math.dist(profile(p), profile(n)) for n in row])
                     for p, row in zip(pos, neg)])


def test_pair_deltas_temperature_by_hand() -> None:
    """Items a = b = (1, 0, 0), c = (0, 1, 0), d = (0, 0, 1); K = 2. Profiles s(a) = (1, 0)
    (b, then c or d), s(c) = (0, 0). τ = 1/ln 3: softmax((ln 3, 0)) = (3/4, 1/4) against
    (1/2, 1/2): Δ(a, c) = ‖(1/4, −1/4)‖ = √2/4. τ = 1 (eq. 5 as published): softmax((1, 0)) =
    (σ(1), σ(−1)), Δ = √2·(σ(1) − 1/2). Δ(c, d) = 0 at any τ (same profile). τ = 0.01:
    softmax((100, 0)) = (1, 0) to 1e-43, so Δ(a, c) = ‖(1/2, −1/2)‖ = √(1 − 1/K), the largest
    distance two sorted profiles can have (docs/methods.md)."""
    emb = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], dtype=DT)
    pos, neg = torch.tensor([0, 2]), torch.tensor([2, 3])
    got = L.pair_deltas(emb, pos, neg, top_k=2, temperature=1 / math.log(3))
    torch.testing.assert_close(got, torch.tensor([math.sqrt(2) / 4, 0.0], dtype=DT))
    paper = L.pair_deltas(emb, pos, neg, top_k=2)
    torch.testing.assert_close(paper, torch.tensor([math.sqrt(2) * (_sig(1) - 0.5), 0.0],
                                                   dtype=DT))
    assert torch.equal(paper, L.pair_deltas(emb, pos, neg, top_k=2, temperature=1.0))
    sharp = L.pair_deltas(emb, pos, neg, top_k=2, temperature=0.01)
    torch.testing.assert_close(sharp, torch.tensor([math.sqrt(1 - 1 / 2), 0.0], dtype=DT))


@pytest.mark.parametrize("tau", [1.0, 0.1, 0.02])
def test_pair_deltas_temperature_match_reference(catalogue, tau) -> None:
    """Δ with τ (eq. 5) against an independent float64 loop, [B, K] negatives, small chunks."""
    gen = torch.Generator().manual_seed(9)
    pos = torch.randint(0, 37, (5,), generator=gen)
    neg = torch.randint(0, 37, (5, 3), generator=gen)
    expected = _reference_deltas(catalogue.numpy(), pos.numpy(), neg.numpy(), 4, tau)
    got = L.pair_deltas(catalogue, pos, neg, top_k=4, temperature=tau, chunk_size=6)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)


def test_sharper_profiles_spread_delta_and_lambda_within_the_bound(catalogue) -> None:
    """τ from 1 to 0.1 to 0.02 spreads λ; as τ → 0 every sorted profile tends to (1, 0, …, 0),
    so Δ → 0 and λ → 1 again. Δ never leaves [0, √(1 − 1/K)] (sorted profiles; ⊂ [0, √2]), so λ
    stays in [σ(0)/σ(mean Δ), σ(√(1 − 1/K))/σ(mean Δ)] (docs/methods.md)."""
    pos, neg = torch.arange(0, 18), torch.arange(18, 36)
    spreads, top = [], math.sqrt(1 - 1 / 5)
    for tau in (1.0, 0.1, 0.02, 1e-4):
        deltas = L.pair_deltas(catalogue, pos, neg, top_k=5, temperature=tau)
        lam = L.hardness_lambdas(deltas)
        assert float(deltas.min()) >= 0 and float(deltas.max()) <= top + 1e-12
        floor = _sig(0) / _sig(float(deltas.mean()))
        ceiling = _sig(top) / _sig(float(deltas.mean()))
        assert floor - 1e-12 <= float(lam.min()) and float(lam.max()) <= ceiling + 1e-12
        spreads.append(float(lam.max() - lam.min()))
    assert spreads[0] < spreads[1] < spreads[2] and spreads[2] > 10 * spreads[0]
    assert spreads[3] < 1e-3 * spreads[2]  # collapsed: every profile one-hot


def test_pair_deltas_temperature_guard(catalogue) -> None:
    for tau in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            L.pair_deltas(catalogue, torch.tensor([0]), torch.tensor([1]), temperature=tau)


def test_spread_by_hand_and_against_numpy() -> None:
    """[1..5]: p10 at position 0.4 -> 1.4, median 3, p90 at 3.6 -> 4.6, max 5; random values
    against numpy's linear percentiles (also past torch.quantile's size limit is not needed)."""
    assert L.spread(torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])) == pytest.approx(
        {"p10": 1.4, "median": 3.0, "p90": 4.6, "max": 5.0})
    assert L.spread(torch.tensor([[7.0]])) == {"p10": 7.0, "median": 7.0, "p90": 7.0, "max": 7.0}
    values = torch.randn(1001, generator=torch.Generator().manual_seed(3), dtype=DT)
    expected = np.percentile(values.numpy(), [10, 50, 90])
    got = L.spread(values)
    np.testing.assert_allclose([got["p10"], got["median"], got["p90"]], expected, rtol=1e-12)
    assert got["max"] == float(values.max())
    with pytest.raises(ValueError, match="empty"):
        L.spread(torch.tensor([]))


# ------------------------------------------------------------------------- NoDO score noise


def test_score_spread_by_hand() -> None:
    """Row [1, 3, 5, 100] with the last entry not allowed: mean 3, variance (4 + 0 + 4)/3, so
    s = √(8/3); all allowed (mask None): the population std of the four values."""
    scores = torch.tensor([[1.0, 3.0, 5.0, 100.0]], dtype=DT)
    allowed = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(L.score_spread(scores, allowed), _vec(math.sqrt(8 / 3)))
    full = np.std([1.0, 3.0, 5.0, 100.0])
    torch.testing.assert_close(L.score_spread(scores), _vec(full))
    assert L.score_spread(torch.tensor([[2.0, 9.0]]), torch.tensor([[False, True]])).item() == 0


def test_score_noise_absolute_is_sigma_times_the_plain_draw() -> None:
    """absolute: z + σ·randn(z.shape, generator) exactly (the draw NoDO always made)."""
    scores = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    got = L.score_noise(scores, 0.3, generator=torch.Generator().manual_seed(4))
    expected = scores + 0.3 * torch.randn(3, 7, generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, expected)
    assert L.score_noise(scores, 0.0) is scores


@pytest.mark.parametrize("scale", ["absolute", "relative"])
def test_score_noise_empirical_std(scale) -> None:
    """Rows of spread s = 0.5 and s = 8 (20,000 scores each): the noise's empirical std is σ
    (absolute) or σ·s (relative), within 2%; with a mask, entries outside it (here huge) do not
    change s."""
    sigma, n = 0.1, 20_000
    base = torch.randn(2, n, generator=torch.Generator().manual_seed(1), dtype=DT)
    base = (base - base.mean(-1, keepdim=True)) / base.std(-1, correction=0, keepdim=True)
    scores = base * _vec(0.5, 8.0)[:, None]
    scores = torch.cat([scores, torch.full((2, 5), 1e6, dtype=DT)], dim=1)
    allowed = torch.ones_like(scores, dtype=torch.bool)
    allowed[:, -5:] = False
    noisy = L.score_noise(scores, sigma, scale=scale, allowed=allowed,
                          generator=torch.Generator().manual_seed(2))
    realised = (noisy - scores)[:, :n].std(-1)
    expected = _vec(sigma, sigma) if scale == "absolute" else sigma * _vec(0.5, 8.0)
    torch.testing.assert_close(realised, expected, rtol=0.02, atol=0)


def test_score_noise_keeps_the_gradient_and_checks_its_arguments() -> None:
    """∂z̃/∂z = 1 in both scales (the spread s is a constant); bad σ or scale raise."""
    scores = torch.randn(2, 4, dtype=DT, requires_grad=True)
    for scale in ("absolute", "relative"):
        out = L.score_noise(scores, 0.5, scale=scale, generator=torch.Generator().manual_seed(0))
        (grad,) = torch.autograd.grad((out * torch.arange(4.0, dtype=DT)).sum(), scores)
        torch.testing.assert_close(grad, torch.arange(4.0, dtype=DT).expand(2, 4))
    with pytest.raises(ValueError, match="std"):
        L.score_noise(scores, -0.1)
    with pytest.raises(ValueError, match="scale"):
        L.score_noise(scores, 0.1, scale="percent")


# ------------------------------------------------------------------------- RecPO


def test_recpo_rewards_by_hand() -> None:
    """Target item 2, w = 0.05.

    Trace 0, s = [3, 1, 2, 0]: one other item ≥ 2 -> rank 2, NDCG = 1/log2(3);
    p = e²/(e³ + e + e² + 1). Trace 1, s = [1, 1, 1, 0]: ties pessimistic -> rank 3,
    NDCG = 1/log2(4) = 0.5; p = e/(3e + 1). With k = 2 trace 1's NDCG is 0.
    """
    s = torch.tensor([[[3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 0.0]]], dtype=DT)
    e = math.e
    p0, p1 = e**2 / (e**3 + e + e**2 + 1), e / (3 * e + 1)
    got = L.recpo_rewards(s, torch.tensor([2]))
    expected = [[0.95 / math.log2(3) + 0.05 * p0, 0.95 * 0.5 + 0.05 * p1]]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=DT))
    cut = L.recpo_rewards(s, torch.tensor([2]), ndcg_k=2)
    torch.testing.assert_close(cut[0, 1], torch.tensor(0.05 * p1, dtype=DT))


def test_group_advantages_by_hand() -> None:
    """R = [1, 2, 3]: gaussian (mean 2, unbiased std 1) -> [−1, 0, 1]; LOO -> [1−2.5, 2−2, 3−1.5].

    A constant group gives zeros; G = 1 gives zeros (no NaN).
    """
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]], dtype=DT)
    gauss = L.group_advantages(r)
    torch.testing.assert_close(gauss[0], torch.tensor([-1.0, 0.0, 1.0], dtype=DT) / (1 + 1e-8))
    assert gauss[1].abs().max().item() == 0.0
    torch.testing.assert_close(
        L.group_advantages(r, "leave_one_out")[0], torch.tensor([-1.5, 0.0, 1.5], dtype=DT)
    )
    for kind in ("gaussian", "leave_one_out"):
        assert L.group_advantages(r[:, :1], kind).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="kind"):
        L.group_advantages(r, "rank")


def test_clipped_surrogate_by_hand() -> None:
    """old log-probs 0, ratios [1.5, 0.5, 1.0], masks [1, 1, 1] and [1, 1, 0] (5 tokens).

    Row A=+1: −min(ρ, clip(ρ, .8, 1.28)) = −[1.28, .5, 1]; row A=−1: −min(−ρ, −clip) = [1.5, .8,
    (masked)]. Token mean: (−2.78 + 2.3)/5 = −0.096. The clipped token (ρ=1.5, A=+1) gets no
    gradient.
    """
    ratios = torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]], dtype=DT)
    logps = ratios.log().requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    loss = L.clipped_surrogate(
        logps, torch.zeros_like(logps), torch.tensor([1.0, -1.0], dtype=DT), mask
    )
    assert loss.item() == pytest.approx((-2.78 + 2.3) / 5)
    loss.backward()
    assert (
        logps.grad[0, 0].item() == 0.0
        and logps.grad[0, 1].item() != 0.0
        and logps.grad[1, 2].item() == 0.0
    )
    per_token = L.clipped_surrogate(
        logps, torch.zeros_like(logps), torch.ones(2, 3, dtype=DT), mask
    )
    assert per_token.item() == pytest.approx(-(1.28 + 0.5 + 1 + 1.28 + 0.5) / 5)
    empty = L.clipped_surrogate(logps, logps, torch.ones(2, dtype=DT), torch.zeros_like(mask))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="advantages"):
        L.clipped_surrogate(logps, logps, torch.ones(3, dtype=DT), mask)


def test_clipped_surrogate_gradcheck() -> None:
    """Away from the clip boundaries the surrogate's gradient matches finite differences."""
    logps = torch.tensor([[0.3, -0.1, 0.05], [0.5, -0.5, 0.0]], dtype=DT, requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 1.0, 2.0]], dtype=DT)
    mask = torch.ones(2, 3)
    assert torch.autograd.gradcheck(
        lambda x: L.clipped_surrogate(x, torch.zeros_like(x), adv, mask), (logps,)
    )
