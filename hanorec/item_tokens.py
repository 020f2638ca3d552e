"""Item tokens: recommender vectors, pooled posters and title vectors as tokens of the LM.

LLaRA's *hybrid item representation* (Liao et al., SIGIR 2024) puts, after each item title of
a prompt, one token whose input embedding is a collaborative item embedding (from SASRec)
passed through a trainable 2-layer MLP; A-LLMRec (Kim et al., KDD 2024) adds a *user token*
from the recommender's sequence state. :class:`ItemEncoder` holds those projectors and the
frozen per-item feature tables, and also gives every item a vector in the LM's hidden space
for the **ranking head** (:mod:`hanorec.readout`).

How the tokens reach the model, for every backbone family and every forward path
(shared-prompt KV / packed / duplicated batch, generation): through the token ids themselves.
The prompt text carries placeholder tokens (:data:`PLACEHOLDERS`, added to the tokenizer as
special tokens); the collator rewrites each one to a **virtual id** above any vocabulary
(:func:`virtual_id`: ``2**30 + v·N + i`` for item ``i``'s collaborative token in the history of a
row that reads view ``v`` of ``N``-item catalogue, ``2**30 + 2**27 + v·N + i`` when a candidate
or query mentions it, ``2**30 + 2**28 + i`` for its pooled poster, ``2**30 + 2**29 + v`` for the
user token). Ids travel through padding, tiling and caching like any other token; a forward
pre-hook on the input-embedding layer swaps virtual ids for 0 before the table look-up, and a
forward hook writes the projected vectors into those positions. Nothing else in the model
changes: image tokens, M-RoPE positions and ``mm_token_type_ids`` see ordinary text tokens.

**Views** (:mod:`hanorec.collab`, cross-fitting). The encoder holds one recommender per view:
view 0 is the model trained on every training sequence (validation and test rows), views
``1..K`` the fold models that give the training rows of their held-out users out-of-sample
features. A row's view is in its ids, so the item tokens, the user token and the head's item
vectors of that row all come from the same recommender (:func:`row_views`).

* item token ``i``: ``P_c(c_i)``, ``c_i`` the recommender's item embedding, ``P_c`` an MLP
  (``LayerNorm → Linear → GELU → Linear``) whose output is scaled at start to the RMS of the
  LM's own token embeddings;
* user token: ``P_u(SASRec(i_1 … i_n))``, the recommender's state over the history item tokens
  that precede it in the row (the history shown), ``P_u`` an MLP of the same shape. Prompts
  place it last, after the chat template's generation prompt — at the answer position, where
  the ranking head reads its state and the first answer token is predicted — so the residual
  stream there starts from the recommender's own prediction;
* poster token ``i``: ``P_v(m_i)``, ``m_i`` the mean of the backbone's vision features for the
  item's image (vision tower + projector, computed once: one token instead of one per patch);
* head vector of item ``i``: ``P_c(c_i) + W_t t_i + W_v m_i`` with ``t_i`` the mean input
  embedding of the title's tokens and ``W_t``, ``W_v`` zero-initialised, so the head starts
  from the collaborative signal and learns what titles and posters add.

Features that a recipe leaves out are absent (``None``) and their terms vanish.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hanorec.data.prompts import PLACEHOLDERS

VIRTUAL_BASE = 1 << 30
MENTION_BASE = VIRTUAL_BASE + (1 << 27)
POSTER_BASE = VIRTUAL_BASE + (1 << 28)
USER_ID = VIRTUAL_BASE + (1 << 29)
WEIGHTS_FILE = "item_encoder.safetensors"
SPEC_FILE = "item_encoder.json"
ATTRIBUTE = "hanorec_item_encoder"


def virtual_id(kind: str, index: int = 0, *, view: int = 0, num_items: int = 0) -> int:
    """The virtual token id of an item token, a poster token (item ``index``) or the user token.

    ``view`` (with the catalogue size ``num_items``) names the recommender an item or user
    token reads (module docstring); posters have no view.
    """
    if view and num_items <= 0 and kind in ("item", "mention"):
        raise ValueError("virtual_id: an item token of a view other than 0 needs num_items")
    offset = view * num_items + index
    if kind == "item":
        return VIRTUAL_BASE + offset
    if kind == "mention":
        return MENTION_BASE + offset
    if kind == "poster":
        return POSTER_BASE + index
    if kind == "user":
        return USER_ID + view
    raise ValueError(f"unknown item-token kind {kind!r}; expected one of {sorted(PLACEHOLDERS)}")


def _token_views(input_ids: Tensor, num_items: int) -> Tensor:
    """Per token: the view of an item, mention or user token, -1 for every other token."""
    users = input_ids >= USER_ID
    items = (input_ids >= VIRTUAL_BASE) & (input_ids < POSTER_BASE)
    offset = torch.where(input_ids >= MENTION_BASE, input_ids - MENTION_BASE,
                         input_ids - VIRTUAL_BASE)
    views = torch.where(items, offset // max(num_items, 1), torch.full_like(input_ids, -1))
    return torch.where(users, input_ids - USER_ID, views)


def row_views(input_ids: Tensor, num_items: int) -> Tensor:
    """``[B]`` the view each row's item and user tokens read (0 for a row without any)."""
    return _token_views(input_ids, num_items).max(dim=-1).values.clamp(min=0)


def ensure_placeholders(tokenizer: Any) -> dict[str, int]:
    """Register the placeholder tokens as special tokens (idempotent); return their ids."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    texts = sorted(set(PLACEHOLDERS.values()))
    missing = [text for text in texts if text not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                             special_tokens=True)
    ids = {kind: tokenizer.convert_tokens_to_ids(text) for kind,
           text in PLACEHOLDERS.items() if kind != "mention"}
    for kind, text in PLACEHOLDERS.items():
        if kind == "mention":
            continue
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if encoded != [ids[kind]]:
            raise ValueError(f"the tokenizer does not encode {text!r} as one token ({encoded})")
    return ids


@dataclass
class EncoderSpec:
    """Shapes and settings of an :class:`ItemEncoder` (saved as ``item_encoder.json``).

    Attributes:
        hidden: The LM's embedding width.
        num_items: Catalogue size.
        collab_dim: Width of the recommender's vectors (0: no collaborative features).
        text: Whether title vectors feed the head.
        image: Whether pooled poster features exist (poster tokens, head term).
        user: Whether the user token is available (needs the recommender network).
        projector_hidden: Hidden width of the MLP projectors.
        similarity: Head score, ``dot`` or ``cos``.
        tau: Temperature of ``cos``.
        sasrec: The recommender's SASRecConfig fields (for the user token), or None.
        views: Recommenders the collaborative tables come from (cross-fitting: K + 1).
        fit: How the views were made (``hanorec.collab``'s ``collab_fit``); with ``folds``,
            ``fold_seed`` and ``holdout`` a later stage recomputes a training row's view
            (:func:`hanorec.collab.row_views_for`).
        prior: The head adds the recommender's own score ``w·⟨u, c_v⟩`` (``w`` learned, 1 at
            start): the language model learns a correction of SASRec (needs the user token).
    """

    hidden: int
    num_items: int
    collab_dim: int = 0
    text: bool = True
    image: bool = False
    user: bool = False
    projector_hidden: int = 0
    similarity: str = "dot"
    tau: float = 0.05
    sasrec: dict[str, Any] | None = None
    views: int = 1
    fit: str = "insample"
    folds: int = 0
    fold_seed: int = 0
    holdout: int = 0
    prior: bool = False

    def __post_init__(self) -> None:
        if self.prior and not self.user:
            raise ValueError("item encoder: the head prior scores with the user token's "
                             "recommender state; it needs the user token")
        if self.views < 1 or self.num_items * self.views > (1 << 27):
            raise ValueError(f"item encoder: {self.views} views of {self.num_items} items do not "
                             "fit the virtual id space (2**27 ids per kind)")


def _mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim_in, elementwise_affine=False), nn.Linear(dim_in, hidden),
                         nn.GELU(), nn.Linear(hidden, dim_out))


class ItemEncoder(nn.Module):
    """Projectors and frozen feature tables of the item, poster and user tokens and the head.

    Args:
        spec: Shapes and settings.
    """

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        width = spec.projector_hidden or spec.hidden
        self.register_buffer("collab",
                             torch.zeros(spec.views, spec.num_items, spec.collab_dim)
                             if spec.collab_dim else None)
        self.register_buffer("text",
                             torch.zeros(spec.num_items, spec.hidden) if spec.text else None)
        self.register_buffer("image",
                             torch.zeros(spec.num_items, spec.hidden) if spec.image else None)
        self.collab_proj = _mlp(spec.collab_dim, width, spec.hidden) if spec.collab_dim else None
        self.user_proj = _mlp(spec.collab_dim, width, spec.hidden) if spec.user else None
        self.poster_proj = _mlp(spec.hidden, width, spec.hidden) if spec.image else None
        self.head_text = nn.Linear(spec.hidden, spec.hidden, bias=False) if spec.text else None
        self.head_image = nn.Linear(spec.hidden, spec.hidden, bias=False) if spec.image else None
        for head in (self.head_text, self.head_image):
            if head is not None:
                nn.init.zeros_(head.weight)
        self.prior_scale = nn.Parameter(torch.ones(())) if spec.prior else None
        self.sasrec: nn.ModuleList | None = None
        if spec.user:
            if spec.sasrec is None or not spec.collab_dim:
                raise ValueError("the user token needs the recommender (collab_dim and sasrec)")
            from hanorec.baselines.sasrec import SASRecConfig, SASRecModel

            self.sasrec = nn.ModuleList(
                SASRecModel(spec.num_items, SASRecConfig(**spec.sasrec)).requires_grad_(False)
                for _ in range(spec.views))

    # ------------------------------------------------------------------ set-up
    def set_features(self, *, collab: Tensor | None = None, text: Tensor | None = None,
                     image: Tensor | None = None,
                     sasrec_states: Sequence[dict[str, Tensor]] | None = None,
                     token_rms: float | None = None) -> ItemEncoder:
        """Fill the frozen tables (and the recommenders), then scale the projectors' output.

        ``collab`` is ``[V, N, d]`` (or ``[N, d]`` for one view); ``sasrec_states`` one state dict
        per view.

        ``token_rms`` (the RMS of the LM's token embeddings) rescales the last layer of each
        projector so that its outputs on the real features have that RMS: an injected token
        starts at the scale of the text around it.
        """
        if collab is not None and collab.dim() == 2:
            collab = collab.unsqueeze(0)
        for name, value in (("collab", collab), ("text", text), ("image", image)):
            if value is not None:
                getattr(self, name).copy_(value.to(getattr(self, name).dtype))
        if sasrec_states is not None and self.sasrec is not None:
            if len(sasrec_states) != len(self.sasrec):
                raise ValueError(f"item encoder: {len(sasrec_states)} recommender states for "
                                 f"{len(self.sasrec)} views")
            for network, state in zip(self.sasrec, sasrec_states):
                network.load_state_dict(state)
        if token_rms:
            self._rescale(token_rms)
        return self

    @torch.no_grad()
    def _rescale(self, target: float) -> None:
        inputs = {"collab_proj": None if self.collab is None else self.collab[0],
                  "poster_proj": self.image}
        if self.user_proj is not None:
            inputs["user_proj"] = self._user_probe()
        for name, features in inputs.items():
            mlp = getattr(self, name)
            if mlp is None or features is None or not len(features):
                continue
            rms = mlp(features.float()).pow(2).mean().sqrt().clamp(min=1e-8)
            mlp[-1].weight.mul_(target / rms)
            mlp[-1].bias.mul_(target / rms)

    def _user_probe(self) -> Tensor:
        """Recommender states (view 0) of single-item sequences: a sample of user-token inputs."""
        count = min(256, self.spec.num_items)
        return self.user_states([[i] for i in range(count)])

    def train(self, mode: bool = True) -> ItemEncoder:
        super().train(mode)
        if self.sasrec is not None:
            self.sasrec.eval()  # frozen recommenders: no dropout, ever
        return self

    # ------------------------------------------------------------------ vectors
    def user_states(self, sequences: list[list[int]], view: int = 0) -> Tensor:
        """``[B, d]`` view ``view``'s recommender states after each 0-based item sequence (no
        gradient)."""
        from hanorec.collab import user_states

        assert self.sasrec is not None and self.spec.sasrec is not None
        return user_states(self.sasrec[view], sequences, self.spec.sasrec["sasrec_max_len"])

    def item_vectors(self, index: Tensor | None = None, view: int = 0) -> Tensor:
        """Head vectors ``[..., hidden]`` of catalogue items ``index`` (None: every item), with
        the collaborative term from view ``view``'s recommender."""
        if index is None:
            index = torch.arange(self.spec.num_items, device=self._device())
        parts = []
        if self.collab_proj is not None:
            parts.append(self.collab_proj(self.collab[view][index]))
        if self.head_text is not None:
            parts.append(self.head_text(self.text[index]))
        if self.head_image is not None:
            parts.append(self.head_image(self.image[index]))
        if not parts:
            raise ValueError("the item encoder has no features for head vectors")
        return torch.stack(parts).sum(0)

    def _device(self) -> torch.device:
        return next(self.buffers()).device

    # ------------------------------------------------------------------ the hook's work
    def forward(self, input_ids: Tensor, embeddings: Tensor) -> Tensor:
        """``embeddings`` with every virtual id's position replaced by its projected vector."""
        out = embeddings.clone()
        num_items, views = self.spec.num_items, self.spec.views
        items = (input_ids >= VIRTUAL_BASE) & (input_ids < POSTER_BASE)
        posters = (input_ids >= POSTER_BASE) & (input_ids < USER_ID)
        users = input_ids >= USER_ID
        offset = torch.where(input_ids >= MENTION_BASE, input_ids - MENTION_BASE,
                             input_ids - VIRTUAL_BASE)
        unknown = (users & (input_ids - USER_ID >= views)) | (
            items & (offset >= num_items * views)) | (
            posters & (input_ids - POSTER_BASE >= num_items))
        if bool(unknown.any()):
            raise ValueError(f"item_tokens: virtual id {int(input_ids[unknown][0])} is out of "
                             "range")
        token_views = _token_views(input_ids, num_items)
        lowest = token_views.masked_fill(token_views < 0, views).min(dim=-1).values
        if bool(((lowest < views) & (lowest != token_views.max(dim=-1).values)).any()):
            raise ValueError("item_tokens: a row mixes item tokens of several views (one row, "
                             "one recommender)")
        if bool(items.any()):
            if self.collab_proj is None or self.collab is None:
                raise ValueError("item_tokens: the prompt has item tokens but the encoder has no "
                                 "such features")
            table = self.collab.reshape(views * num_items, -1)
            out[items] = self.collab_proj(table[offset[items]]).to(out.dtype)
        if bool(posters.any()):
            out[posters] = self._project("poster_proj", self.image,
                                         input_ids[posters] - POSTER_BASE, out.dtype)
        if bool(users.any()):
            if self.user_proj is None:
                raise ValueError("item_tokens: the prompt has a user token but the encoder has "
                                 "no user projector")
            out[users] = self._user_vectors(input_ids, users).to(out.dtype)
        return out

    def _user_vectors(self, input_ids: Tensor, users: Tensor) -> Tensor:
        """Projected recommender states at the user-token positions (row-major)."""
        assert self.user_proj is not None
        states = self._recommender_states(input_ids, users)
        return self.user_proj(states.to(self.user_proj[1].weight.dtype))

    def _recommender_states(self, input_ids: Tensor, users: Tensor) -> Tensor:
        """``[U, d]`` recommender states at the user-token positions (row-major), each from its
        view's recommender over the history item tokens before it."""
        histories = _histories_before(input_ids, users, self.spec.num_items)
        views = (input_ids[users] - USER_ID).tolist()
        states = torch.empty(len(views), self.spec.collab_dim, device=input_ids.device)
        for view in sorted(set(views)):
            where = [n for n, v in enumerate(views) if v == view]
            states[where] = self.user_states([histories[n] for n in where], view).to(states)
        return states

    def prior_states(self, input_ids: Tensor) -> Tensor:
        """``[B, d]`` each row's recommender state at its (last) user token: what the head prior
        scores items with (:mod:`hanorec.readout`)."""
        users = input_ids >= USER_ID
        last = users & (users.long().cumsum(-1) == users.long().sum(-1, keepdim=True))
        if not bool((last.sum(-1) == 1).all()):
            raise ValueError("item_tokens: the head prior needs one user token in every row")
        return self._recommender_states(input_ids, last)

    def _project(self, name: str, table: Tensor | None, index: Tensor,
                 dtype: torch.dtype) -> Tensor:
        mlp = getattr(self, name)
        if mlp is None or table is None:
            raise ValueError(f"item_tokens: the prompt has {name.split('_')[0]} tokens but the "
                             "encoder has no such features")
        return mlp(table[index]).to(dtype)


def _histories_before(input_ids: Tensor, users: Tensor, num_items: int) -> list[list[int]]:
    """For every user-token position (row-major), the item indices of the row's history item
    tokens before it, in order (mentions — candidates, queries — are not history)."""
    items = (input_ids >= VIRTUAL_BASE) & (input_ids < MENTION_BASE)
    histories = []
    for row, position in users.nonzero().tolist():
        ids = input_ids[row, :position]
        histories.append(((ids[items[row, :position]] - VIRTUAL_BASE) % num_items).tolist())
    if any(not h for h in histories):
        raise ValueError("item_tokens: a user token with no item token before it (the history "
                         "needs item tokens)")
    return histories


# ---------------------------------------------------------------------- attaching to a model


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attached_encoder(model: nn.Module) -> ItemEncoder | None:
    """The encoder attached to ``model`` (through a PEFT wrapper), or None."""
    return getattr(_base(model), ATTRIBUTE, None)


def attach_item_encoder(model: nn.Module, encoder: ItemEncoder) -> ItemEncoder:
    """Make ``encoder`` a submodule of ``model`` and hook it into the input embeddings.

    The encoder's parameters then belong to the model (optimizer, checkpoints, DDP); a second
    call replaces the first encoder and its hooks.
    """
    base = _base(model)
    detach_item_encoder(model)
    device = next(base.parameters()).device
    setattr(base, ATTRIBUTE, encoder.to(device))
    embeddings = base.get_input_embeddings()
    pending: dict[str, Tensor] = {}

    def before(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        ids = args[0]
        virtual = ids >= VIRTUAL_BASE
        if not bool(virtual.any()):
            return None
        pending["ids"] = ids
        return (ids.masked_fill(virtual, 0), *args[1:])

    def after(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        ids = pending.pop("ids", None)
        if ids is None:
            return None
        return getattr(base, ATTRIBUTE)(ids, output)

    encoder._hooks = [embeddings.register_forward_pre_hook(before),
                      embeddings.register_forward_hook(after)]
    return encoder


def detach_item_encoder(model: nn.Module) -> ItemEncoder | None:
    """Remove the encoder and its hooks from ``model``; return it (None if there was none)."""
    base = _base(model)
    encoder = getattr(base, ATTRIBUTE, None)
    if encoder is None:
        return None
    for handle in getattr(encoder, "_hooks", []):
        handle.remove()
    encoder._hooks = []
    delattr(base, ATTRIBUTE)
    return encoder


@contextmanager
def encoder_detached(model: nn.Module) -> Iterator[ItemEncoder | None]:
    """Detach the encoder for the block (``save_pretrained`` of a full model), then re-attach."""
    encoder = detach_item_encoder(model)
    try:
        yield encoder
    finally:
        if encoder is not None:
            attach_item_encoder(model, encoder)


def save_item_encoder(encoder: ItemEncoder, folder: str | Path) -> None:
    """Write ``item_encoder.safetensors`` (weights and tables) and ``item_encoder.json`` (spec)."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / SPEC_FILE).write_text(json.dumps(asdict(encoder.spec), indent=2))


def load_item_encoder(folder: str | Path) -> ItemEncoder | None:
    """The encoder saved in ``folder``, or None when the folder has none."""
    folder = Path(folder)
    if not (folder / SPEC_FILE).is_file():
        return None
    encoder = ItemEncoder(EncoderSpec(**json.loads((folder / SPEC_FILE).read_text())))
    encoder.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return encoder
