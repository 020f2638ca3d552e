"""Offline tokenizer and chat template for the tiny built-in backbones.

No tokenizer can be downloaded at run time, so the tiny backbones train a small byte-level BPE
on a fixed built-in corpus with the ``tokenizers`` library. Byte-level BPE never produces an
unknown token: any title in any script encodes, just into more pieces. Training is
deterministic (same corpus, same merges), so two builds give the same vocabulary.

The chat template is ChatML (``<|im_start|>role\\n...<|im_end|>\\n``), the format SmolLM2 and
Qwen use, extended to Hugging Face multimodal content lists: a ``{"type": "image"}`` part is
rendered as the family's image placeholder (``<image>`` for LLaVA/Idefics3,
``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen2-VL), which the processor then expands
to one token per vision feature.
"""

from __future__ import annotations

import itertools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"

#: Special tokens every tiny tokenizer carries (the union of what the three processors need).
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    "<image>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
)

_WORDS = """
the of and to a in is you that it he was for on are as with his they i at be this have from or
one had by word but not what all were we when your can said there use an each which she do how
their if will up other about out many then them these so some her would make like him into time
has look two more write go see number no way could people my than first water been call who oil
its now find long down day did get come made may part user assistant system history watched
movie film item title rated liked next recommend will like yes no answer which candidates
following choose from among list the user has recently what would they enjoy most likely
action adventure animation children comedy crime documentary drama fantasy noir horror musical
mystery romance sci fi thriller war western love story night man woman world life city king
star dark last great little big house lost return day dead time home summer black white red
blue green new old back american true game girl boy family road war blood heart death space
poster image picture photo product shop buy book music video game toy beauty sports clothing
""".split()

_PUNCT = list(".,:;!?'\"()[]-_/&*+=#%$@<>|")


def _corpus() -> list[str]:
    """Return the fixed training corpus: words, capitalised words, digits, years, punctuation.

    Returns:
        A list of short lines, identical on every call.
    """
    lines = [" ".join(_WORDS), " ".join(w.capitalize() for w in _WORDS), *_WORDS]
    lines += [" ".join(str(n) for n in range(start, start + 100)) for start in range(0, 2100, 100)]
    lines += [f"({year})" for year in range(1900, 2030)]
    lines += [" ".join(pair) for pair in itertools.product(_WORDS[:40], _PUNCT[:8])]
    lines += [f'User watched "{a.capitalize()} {b}" {p}' for a, b,
              p in zip(_WORDS, _WORDS[1:], _PUNCT * 40)]
    return lines


def train_tiny_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """Train the deterministic byte-level BPE of the tiny backbones.

    Args:
        vocab_size: Target vocabulary size, special tokens and the 256-byte alphabet included.

    Returns:
        A trained ``tokenizers.Tokenizer`` whose first ids are :data:`SPECIAL_TOKENS`.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def tiny_hf_tokenizer(chat_template: str, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Wrap :func:`train_tiny_tokenizer` as an HF tokenizer with pad/eos/bos and a chat template.

    Args:
        chat_template: The Jinja chat template (see :func:`chatml_template`).
        vocab_size: Target BPE vocabulary size.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``pad_token=<|endoftext|>``, ``eos_token=<|im_end|>``,
        ``bos_token=<|im_start|>`` (never added automatically) and every special token registered.
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tiny_tokenizer(vocab_size),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS
                                   if t not in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)],
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = chat_template
    return tok


def chatml_template(image_marker: str, default_system: str | None = None) -> str:
    """Build a ChatML Jinja template that understands multimodal content lists.

    A message's ``content`` may be a string or a list of parts ``{"type": "text", "text": ...}``
    and ``{"type": "image"}``; image parts render as ``image_marker``.

    Args:
        image_marker: Text that stands for one image before the processor expands it.
        default_system: System prompt inserted when the conversation has none (SmolLM2 style).

    Returns:
        The template source.
    """
    system = ""
    if default_system is not None:
        system = (
            "{%- if messages[0]['role'] != 'system' -%}"
            "{{ '<|im_start|>system\\n" + default_system.replace("'", "\\'") + "<|im_end|>\\n' }}"
            "{%- endif -%}"
        )
    return (
        system + "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '" + image_marker + "' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )
