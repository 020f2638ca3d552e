"""hanorec: multimodal preference optimization for LLM-based sequential recommendation.

The package is import-light on purpose: ``import hanorec`` pulls in nothing heavy, and
``hanorec.losses`` depends on torch alone so that other DPO codebases can reuse it.
"""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft) warns on every import, on CPUs with AVX512-BF16, that it cannot
# fetch an optional 4-bit kernel from the hub. hanorec never downloads at run time, so the
# message is noise; its own fallback kernel is what runs.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
