"""hanorec: multimodal preference optimization for LLM-based sequential recommendation.

The package is import-light on purpose: ``import hanorec`` pulls in nothing heavy, and
``hanorec.losses`` depends on torch alone so that other DPO codebases can reuse it.
"""

__version__ = "0.1.0"
