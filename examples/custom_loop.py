"""HaNoRec in a hand-written PyTorch DPO loop: only ``hanorec.losses`` (torch) and a tiny Llama.

Toy task: 16 items, each a 3-token "title"; a prompt is 6 random tokens, the chosen response
the user's next item and the rejected one another item. Runs in seconds on CPU:

    python examples/custom_loop.py
"""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hanorec.losses import (
    hardness_lambdas,
    hars_betas,
    pair_deltas,
    preference_loss,
    reward_margins,
    sequence_logps,
)

torch.manual_seed(0)
VOCAB, ITEMS, PAIRS, BETA0, SIGMA = 64, 16, 32, 0.5, 0.1
config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
policy = LlamaForCausalLM(config)
reference = copy.deepcopy(policy).eval().requires_grad_(False)  # the frozen SFT model

titles = torch.randint(0, VOCAB, (ITEMS, 3))  # item k's title tokens
prompts = torch.randint(0, VOCAB, (PAIRS, 6))
chosen_items = torch.randint(0, ITEMS, (PAIRS,))
rejected_items = (chosen_items + torch.randint(1, ITEMS, (PAIRS,))) % ITEMS

# HaRS static hardness, once for the whole training set (eqs. 5-6). Here the item embeddings
# are random; in hanorec they fuse title and image features (hanorec.losses.fuse_item_embeddings).
item_embeddings = torch.randn(ITEMS, 8)
lambdas = hardness_lambdas(pair_deltas(item_embeddings, chosen_items, rejected_items, top_k=4))


def logps(model, items, noise_std=0.0):
    """Summed log-probs of each prompt's response (the item's title), NoDO noise optional."""
    tokens = torch.cat([prompts, titles[items]], dim=1)
    labels = tokens.clone()
    labels[:, : prompts.shape[1]] = -100  # score response tokens only
    logits = model(input_ids=tokens).logits
    return sequence_logps(logits[:, :-1], labels[:, 1:], noise_std=noise_std)


optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
for step in range(30):
    # Policy forward with NoDO logit noise (training only); the reference is never perturbed.
    chosen, rejected = logps(policy, chosen_items, SIGMA), logps(policy, rejected_items, SIGMA)
    with torch.no_grad():
        ref_chosen, ref_rejected = logps(reference, chosen_items), logps(reference, rejected_items)
    h = reward_margins(chosen, rejected, ref_chosen, ref_rejected)  # implicit reward margins
    # eq. 8 (η from h, no gradient) and eq. 11: β_i = max(1e-6, β0·η·λ_i)
    beta, eta = hars_betas("dynamic", BETA0, lambdas, h)
    out = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)  # eq. 12
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    if step % 5 == 0 or step == 29:
        print(f"step {step:2d}  loss {out.loss.item():.4f}  eta {eta.item():.3f}  "
              f"beta {beta.min().item():.3f}..{beta.max().item():.3f}  "
              f"accuracy {out.accuracies.mean().item():.2f}")
